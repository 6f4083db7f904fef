"""``sar``: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023).

Entropy minimisation on reliable samples (entropy below ``e_margin``) with a
sharpness-aware (SAM) step, so the adapted weights sit in a flat region of the
entropy surface; samples whose entropy after the SAM perturbation exceeds the margin
are dropped too. A moving average of that entropy detects collapse (it falls below
``reset_constant``) and restores the source weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import TTAMethod
from .entropy import softmax_entropy
from .optim import gated_reset, sam_ascent, undo_sam_ascent
from .params import sar_paper_lr
from .records import SARRecord, StepRecord
from .registry import register_method


@register_method("sar")
class SAR(TTAMethod):
    """SAR. Defaults are the paper's and its official code's: SGD with momentum 0.9
    and ``lr="paper"`` (:func:`~tta.methods.params.sar_paper_lr`: 2.5e-4 for ResNets
    at batch >= 32, ``2.5e-4 / 64 * B * 2`` below, ``1e-3 * B / 64`` for ViTs,
    doubled at batch size 1, e.g. 1.6e-5 for a ResNet at batch size 1), ``rho =
    0.05``, the entropy margin of :attr:`margin_fractions` (``0.4 ln C``),
    ``reset_constant = 0.2``, moving-average momentum 0.9, and the official code's
    frozen modules (``skip_modules="paper"``: ``layer4`` of a ResNet, blocks 9-11 and
    the final norm of a ViT, nothing on 3-stage CIFAR ResNets).
    Presets: ``"imagenet"`` is these defaults; ``"cifar10"`` the CIFAR-10-C setting
    of mariodoebler/test-time-adaptation (cfgs/cifar10_c/sar.yaml): lr 1e-3 with SGD,
    momentum 0.9. That yaml says ``METHOD: Adam``, but the port's ``SAR.setup_optimizer``
    never reads it: it always builds SAM over ``torch.optim.SGD`` with ``OPTIM.LR`` and
    ``OPTIM.MOMENTUM`` (no Nesterov), so SGD is what its CIFAR-10-C numbers ran.

    Args:
        rho: radius of the SAM perturbation.
        e_margin: entropy threshold of reliable samples.
        reset_constant: reset to the source when the moving average of the
            post-perturbation entropy falls below this (None disables recovery).
        ema_momentum: momentum of that moving average.
        step_when_empty: on a batch where no sample passes both filters, still take
            the optimizer step on the zero gradient, as the official code does
            (momentum keeps moving the weights); by default the step is skipped.
    """

    # cifar10: the port's SAM over SGD (its setup_optimizer ignores the yaml's "Adam").
    presets = {"cifar10": {"lr": 1e-3}, "imagenet": {}}
    margin_fractions = {"e_margin": 0.4}
    record_type = SARRecord

    def __init__(
        self,
        model: nn.Module,
        *,
        rho: float = 0.05,
        e_margin: float | None = None,
        reset_constant: float | None = 0.2,
        ema_momentum: float = 0.9,
        step_when_empty: bool = False,
        skip_modules: str | list[str] = "paper",
        lr: float | str = "paper",
        **kwargs,
    ) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        super().__init__(model, skip_modules=skip_modules, lr=lr, **kwargs)
        self.rho, self.e_margin, self.step_when_empty = rho, e_margin, step_when_empty
        self.reset_constant, self.ema_momentum = reset_constant, ema_momentum
        self.register_buffer("ema", torch.tensor(float("nan")))
        self.register_buffer("num_resets", torch.tensor(0))

    def paper_lr(self, batch_size: int) -> float:
        return sar_paper_lr(self.model, batch_size)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        params = [p for _, p in self.adapted]
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        e_margin = self.margin("e_margin", logits.shape[1])
        reliable = entropy < e_margin
        n1 = reliable.sum()
        self.backward((entropy * reliable).sum().div(n1.clamp_min(1)))

        # SAM: the gradient at the worst point within radius rho updates the weights.
        offsets = sam_ascent(params, self.rho, self.grad_scale())
        self.optimizer.zero_grad(set_to_none=True)
        entropy2 = softmax_entropy(self.model(x))
        selected = reliable & (entropy2.detach() < e_margin)
        n2 = selected.sum()
        loss2 = (entropy2 * selected).sum() / n2.clamp_min(1)
        self.backward(loss2)
        undo_sam_ascent(params, offsets)
        self.step(enabled=None if self.step_when_empty else n2 > 0)

        if self.reset_constant is not None:
            self._recover_if_collapsed(loss2.detach(), n2 > 0, params)
        record = SARRecord(x.shape[0], n2, loss2.detach(), num_reliable=n1, ema=self.ema.clone(),
                           num_resets=self.num_resets.clone())
        return logits.detach(), record

    @torch.no_grad()
    def _recover_if_collapsed(self, loss: Tensor, valid: Tensor, params: list[Tensor]) -> None:
        m = self.ema_momentum
        moved = torch.where(self.ema.isnan(), loss, m * self.ema + (1 - m) * loss)
        self.ema = torch.where(valid, moved, self.ema)
        collapsed = self.ema < self.reset_constant
        gated_reset(params, self.source_params(), self.optimizer, collapsed)
        self.ema = torch.where(collapsed, torch.full_like(self.ema, float("nan")), self.ema)
        self.num_resets += collapsed.long()
