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

from .base import StepRecord, TTAMethod
from .entropy import entropy_margin, softmax_entropy
from .optim import gated_reset
from .params import frozen_top, sar_paper_lr, select_norm_params
from .registry import register_method


@register_method("sar")
class SAR(TTAMethod):
    """SAR. Defaults are the paper's and its official code's: SGD with momentum 0.9
    and ``lr="paper"`` (:func:`~tta.methods.base.sar_paper_lr`: 2.5e-4 for ResNets
    at batch >= 32, ``2.5e-4 / 64 * B * 2`` below, ``1e-3 * B / 64`` for ViTs,
    doubled at batch size 1, e.g. 1.6e-5 for a ResNet at batch size 1), ``rho =
    0.05``, ``e_margin = 0.4 ln C``, ``reset_constant = 0.2``, moving-average
    momentum 0.9, and the official code's frozen modules (``skip_modules="paper"``).
    Presets: ``"imagenet"`` is these defaults; ``"cifar10"`` the CIFAR-10-C setting
    of mariodoebler/test-time-adaptation (cfgs/cifar10_c/sar.yaml): Adam, lr 1e-3.

    Args:
        rho: radius of the SAM perturbation.
        e_margin: entropy threshold of reliable samples (default ``0.4 * ln C``).
        reset_constant: reset to the source when the moving average of the
            post-perturbation entropy falls below this (None disables recovery).
        ema_momentum: momentum of that moving average.
        skip_modules: which norm layers stay frozen: ``"paper"`` (the official
            code's rule, see :func:`~tta.methods.base.paper_frozen_modules`: ``layer4``
            of a ResNet, blocks 9-11 and the final norm of a ViT, nothing on 3-stage
            CIFAR ResNets), ``"last_stage"`` (the deepest stage, see
            :func:`~tta.methods.base.last_stage_prefixes`), ``"none"``, or a list of
            module names.
        step_when_empty: on a batch where no sample passes both filters, still take
            the optimizer step on the zero gradient, as the official code does
            (momentum keeps moving the weights); by default the step is skipped.
    """

    presets = {"cifar10": {"optimizer": "adam", "lr": 1e-3}, "imagenet": {}}

    def __init__(
        self,
        model: nn.Module,
        *,
        rho: float = 0.05,
        e_margin: float | None = None,
        reset_constant: float | None = 0.2,
        ema_momentum: float = 0.9,
        skip_modules: str | list[str] = "paper",
        step_when_empty: bool = False,
        lr: float | str = "paper",
        **kwargs,
    ) -> None:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if kwargs.get("amp") == "fp16":
            # The SAM perturbation reads raw gradients, which a float16 scaler scales.
            raise ValueError("sar supports amp='bf16' (or None), not 'fp16'")
        self.skip_modules = skip_modules
        self.step_when_empty = step_when_empty
        super().__init__(model, lr=lr, **kwargs)
        self.rho, self.e_margin = rho, e_margin
        self.reset_constant, self.ema_momentum = reset_constant, ema_momentum
        self.register_buffer("ema", torch.tensor(float("nan")))
        self.register_buffer("num_resets", torch.tensor(0))
        self._source_params = [p.detach().clone() for _, p in self.adapted]

    def select_params(self):
        return select_norm_params(self.model, frozen_top(self.model, self.skip_modules))

    def paper_lr(self, batch_size: int) -> float:
        return sar_paper_lr(self.model, batch_size)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        params = [p for _, p in self.adapted]
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        e_margin = entropy_margin(self.e_margin, 0.4, logits.shape[1])
        reliable = entropy < e_margin
        n1 = reliable.sum()
        (entropy * reliable).sum().div(n1.clamp_min(1)).backward()

        # SAM: climb to the worst point within radius rho, take the gradient there.
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            eps = [g * (self.rho / (norm + 1e-12)) for g in grads]
            torch._foreach_add_(params, eps)
        self.optimizer.zero_grad(set_to_none=True)
        entropy2 = softmax_entropy(self.model(x))
        selected = reliable & (entropy2.detach() < e_margin)
        n2 = selected.sum()
        loss2 = (entropy2 * selected).sum() / n2.clamp_min(1)
        loss2.backward()
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        self.step(enabled=None if self.step_when_empty else n2 > 0)

        if self.reset_constant is not None:
            self._recover_if_collapsed(loss2.detach(), n2 > 0, params)
        record = StepRecord(
            num_samples=x.shape[0],
            num_selected=n2,
            loss=loss2.detach(),
            extra={"num_reliable": n1, "ema": self.ema.clone(), "num_resets": self.num_resets.clone()},
        )
        return logits.detach(), record

    @torch.no_grad()
    def _recover_if_collapsed(self, loss: Tensor, valid: Tensor, params: list[Tensor]) -> None:
        m = self.ema_momentum
        moved = torch.where(self.ema.isnan(), loss, m * self.ema + (1 - m) * loss)
        self.ema = torch.where(valid, moved, self.ema)
        collapsed = self.ema < self.reset_constant
        gated_reset(params, self._source_params, self.optimizer, collapsed)
        self.ema = torch.where(collapsed, torch.full_like(self.ema, float("nan")), self.ema)
        self.num_resets += collapsed.long()
