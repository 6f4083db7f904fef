"""Entropies the methods minimise, select by and compare against.

One ``softmax_entropy`` for every method: Tent's loss, EATA/SAR/DeYO's sample
selection, the collapse guard's check, TPT/RLCF's confident-view selection (and
TPT's marginal entropy over views, in :mod:`.clip_views`); plus the papers' margins
as fractions of ``ln(num_classes)``. Computed in float32 at least, since logits may come from an
autocast region.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["softmax_entropy", "entropy_margin"]


def softmax_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``dim``: ``-sum p log p``."""
    log_p = logits.float().log_softmax(dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def entropy_margin(value: float | None, fraction: float, num_classes: int) -> float:
    """``value`` if given, else ``fraction * ln(num_classes)``: papers state margins as
    fractions of the maximum entropy so one default serves 10 and 1000 classes."""
    return value if value is not None else fraction * math.log(num_classes)
