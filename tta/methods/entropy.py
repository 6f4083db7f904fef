"""Entropies the methods minimise, select by and compare against.

One ``softmax_entropy`` for every method: Tent's loss, EATA/SAR/DeYO's sample
selection, the collapse guard's check, TPT/RLCF's confident-view selection; plus
TPT's marginal entropy over views and the papers' margins as fractions of
``ln(num_classes)``. Computed in float32 at least, since logits may come from an
autocast region.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["softmax_entropy", "entropy_margin", "marginal_entropy", "select_confident"]


def softmax_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``dim``: ``-sum p log p``."""
    log_p = logits.float().log_softmax(dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def entropy_margin(value: float | None, fraction: float, num_classes: int) -> float:
    """``value`` if given, else ``fraction * ln(num_classes)``: papers state margins as
    fractions of the maximum entropy so one default serves 10 and 1000 classes."""
    return value if value is not None else fraction * math.log(num_classes)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the average prediction over views: logits (..., k, classes) ->
    (...,). TPT's loss: ``-sum p̄ log p̄`` with ``p̄ = mean_k softmax(logits)``,
    computed in log space in float32."""
    log_p = logits.float().log_softmax(dim=-1)
    log_mean = log_p.logsumexp(dim=-2) - math.log(logits.shape[-2])
    return -(log_mean.exp() * log_mean).sum(dim=-1)


def select_confident(logits: Tensor, fraction: float = 0.1) -> Tensor:
    """Indices (B, k) of the ``k = max(1, int(N * fraction))`` views with the lowest
    prediction entropy per image, given view logits (B, N, classes), most confident
    first (TPT's confidence selection, ``selection_p``)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the selected fraction must be in (0, 1], got {fraction!r}")
    k = max(1, int(logits.shape[1] * fraction))
    return softmax_entropy(logits).topk(k, dim=1, largest=False).indices
