"""``source``: the unadapted model, the baseline every method must beat."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import TTAMethod
from .records import StepRecord
from .registry import register_method


@register_method("source")
class Source(TTAMethod):
    """Predict with the source model in eval mode; nothing changes."""

    batch_stats = False
    has_optimizer = False

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        return self.model(x), StepRecord(num_samples=x.shape[0], num_selected=0)
