"""``eata``: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022).

Entropy minimisation on *reliable* samples (entropy below ``e_margin``) that are
*non-redundant* (their prediction differs from the running mean prediction by a
cosine similarity below ``d_margin``), weighted by ``exp(e_margin - entropy)``,
plus an EWC-style Fisher regulariser that keeps important weights near the source.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TTAMethod
from .entropy import check_weight_margin, softmax_entropy
from .inputs import to_model_input
from .records import EATARecord, StepRecord
from .registry import register_method


@register_method("eata")
class EATA(TTAMethod):
    """EATA. Defaults are the paper's ImageNet-C setting (SGD, momentum 0.9,
    lr 2.5e-4 for batch 64, the entropy margin of :attr:`margin_fractions`
    (``e_margin = 0.4 ln C``), ``d_margin = 0.05``,
    ``fisher_alpha = 2000``, 2000 Fisher samples).

    Args:
        e_margin: entropy threshold of reliable samples.
        d_margin: cosine-similarity threshold of redundant samples.
        fisher_alpha: weight of the Fisher regulariser (0 disables it).
        fisher_loader: iterable of source images, or (images, labels) pairs, in
            [0, 1]; the Fisher information is estimated on it at wrap time with the
            model's own predictions as labels (as the paper does).
        fisher_size: how many images of ``fisher_loader`` to use.

    Presets: ``"imagenet"`` is these defaults; ``"cifar10"`` the CIFAR-10-C setting
    of mariodoebler/test-time-adaptation (cfgs/cifar10_c/eata.yaml): Adam, lr 1e-3,
    ``d_margin = 0.4``, ``fisher_alpha = 1``, 2000 Fisher samples.

    ``reset()`` (``episodic``, tta-bench's per-domain resets, ``reset_every``) also
    forgets the mean prediction, as the port and RDumb's code do; the official EATA's
    ``reset`` keeps it, so there a new domain's first batch is already checked for
    redundancy against the previous domain's mean prediction.
    """

    presets = {
        "cifar10": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4, "fisher_alpha": 1.0, "fisher_size": 2000},
        "imagenet": {},
    }
    margin_fractions = {"e_margin": 0.4}
    record_type = EATARecord

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float | None = None,
        d_margin: float = 0.05,
        fisher_alpha: float = 2000.0,
        fisher_loader: Iterable | None = None,
        fisher_size: int = 2000,
        **kwargs,
    ) -> None:
        check_weight_margin("e_margin", e_margin)
        super().__init__(model, **kwargs)
        self.e_margin, self.d_margin, self.fisher_alpha = e_margin, d_margin, fisher_alpha
        # Mean prediction of the samples used so far; NaN until the first update.
        self.register_buffer("mean_probs", torch.tensor(float("nan")))
        self.fisher: list[Tensor] = []
        self.anchors: list[Tensor] = []
        if fisher_alpha > 0 and fisher_loader is not None:
            self._estimate_fisher(fisher_loader, fisher_size)
        elif fisher_alpha > 0 and type(self) is EATA:
            raise ValueError(
                "eata needs fisher_loader (source images) for its Fisher regulariser; "
                "pass one, set fisher_alpha=0, or use method 'eta'"
            )

    def _estimate_fisher(self, loader: Iterable, size: int) -> None:
        params = [p for _, p in self.adapted]
        fisher = [torch.zeros_like(p) for p in params]
        seen, batches = 0, 0
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = to_model_input(images[: size - seen], self.model)
            with self.logits_only():
                logits = self.model(images)
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, params)
            for f, g in zip(fisher, grads):
                f.add_(g.detach() ** 2)
            seen, batches = seen + images.shape[0], batches + 1
            if seen >= size:
                break
        if batches == 0:
            raise ValueError("fisher_loader yielded no images")
        self.fisher = [f / batches for f in fisher]
        self.anchors = [p.detach().clone() for p in params]

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        e_margin = self.margin("e_margin", logits.shape[1])
        reliable = entropy < e_margin

        probs = logits.detach().softmax(1)
        cosine = F.cosine_similarity(self.mean_probs.expand_as(probs), probs, dim=1)
        # Before the first update there is no mean prediction: nothing is redundant.
        novel = self.mean_probs.isnan().any() | (cosine.abs() < self.d_margin)
        selected = reliable & novel
        weight = selected.float() * torch.exp(e_margin - entropy.detach())
        count = selected.sum()
        loss = (entropy * weight).sum() / count.clamp_min(1)
        if self.fisher:
            params = [p for _, p in self.adapted]
            penalty = sum(
                (f * (p - p0) ** 2).sum() for f, p, p0 in zip(self.fisher, params, self.anchors)
            )
            loss = loss + self.fisher_alpha * penalty
        self.backward(loss)
        self.step(enabled=count > 0)
        self._update_mean_probs(probs, selected, count)
        return logits.detach(), EATARecord(x.shape[0], count, loss.detach(), num_reliable=reliable.sum())

    @torch.no_grad()
    def _update_mean_probs(self, probs: Tensor, selected: Tensor, count: Tensor) -> None:
        batch_mean = (probs * selected[:, None]).sum(0) / count.clamp_min(1)
        moved = torch.where(self.mean_probs.isnan(), batch_mean, 0.9 * self.mean_probs + 0.1 * batch_mean)
        self.mean_probs = torch.where(count > 0, moved, self.mean_probs)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # The Fisher and its anchors are plain tensors, here and in the snapshot a reset
        # loads them from: they follow `.to(device)` / `.double()` as the parameters do
        # (else the penalty mixes devices).
        extra = (self._source_state or {}).get("_extra_state", {})
        for holder in (self.__dict__, extra):
            for key in ("fisher", "anchors"):
                if key in holder:
                    holder[key] = [fn(t) for t in holder[key]]
        return self

    def get_extra_state(self):
        state = super().get_extra_state()
        state["fisher"] = [f.clone() for f in self.fisher]
        state["anchors"] = [a.clone() for a in self.anchors]
        return state

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.fisher = [f.clone() for f in state.get("fisher", [])]
        self.anchors = [a.clone() for a in state.get("anchors", [])]
