"""``norm``: test-time BatchNorm statistics (Nado et al. 2020; Schneider et al. 2020).

Only the normalisation statistics change: each batch is normalised with its own
mean and variance, optionally mixed with the source statistics by ``alpha``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import TTAMethod
from .norm_layers import check_bn_alpha
from .records import StepRecord
from .registry import register_method


@register_method("norm")
class Norm(TTAMethod):
    """BatchNorm with test-batch statistics; no parameter is trained.

    Args:
        alpha: weight of the test-batch statistics; ``1 - alpha`` goes to the source
            statistics (Schneider et al.'s ``N / (N + n)`` prior corresponds to
            ``alpha = n / (N + n)``). ``alpha < 1`` works at batch size 1.
    """

    has_optimizer = False

    def __init__(self, model: nn.Module, *, alpha: float = 1.0, **kwargs) -> None:
        # ``alpha`` is the paper's name for the shared ``bn_alpha`` option: either
        # sets it (the batch-size-1 advice names bn_alpha for every method)
        given = "bn_alpha" if "bn_alpha" in kwargs else "alpha"
        bn_alpha = kwargs.pop("bn_alpha", alpha)
        if alpha != 1.0 and bn_alpha != alpha:
            raise ValueError(f"norm: alpha={alpha!r} and bn_alpha={bn_alpha!r} are one option, the weight of "
                             "the test-batch statistics: give one")
        check_bn_alpha(bn_alpha, given, "norm")  # here, to name the option the user gave
        super().__init__(model, bn_alpha=bn_alpha, **kwargs)

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        return self.model(x), StepRecord(num_samples=x.shape[0], num_selected=x.shape[0])
