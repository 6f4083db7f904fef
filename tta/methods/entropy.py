"""Entropies the methods minimise, select by and compare against, and the
cross-entropies between two predictions that the teacher-student methods learn by.

One ``softmax_entropy`` for every method: Tent's loss, EATA/SAR/DeYO's sample
selection, the collapse guard's check, TPT/RLCF's confident-view selection (and
TPT's marginal entropy over views, in :mod:`.clip_views`); plus the papers' margins
as fractions of ``ln(num_classes)``. Computed in float32 at least, since logits may come from an
autocast region.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["softmax_entropy", "marginal_entropy", "entropy_margin", "check_weight_margin", "cross_entropy_to",
           "symmetric_cross_entropy", "soft_likelihood_ratio"]


def softmax_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``dim``: ``-sum p log p``."""
    log_p = logits.float().log_softmax(dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def entropy_margin(value: float | None, fraction: float, num_classes: int) -> float:
    """``value`` if given, else ``fraction * ln(num_classes)``: papers state margins as
    fractions of the maximum entropy so one default serves 10 and 1000 classes."""
    return value if value is not None else fraction * math.log(num_classes)


#: The largest margin a sample weight ``exp(margin - entropy)`` may take: entropies are
#: at most ln C (6.9 for 1000 classes), and exp(50) leaves float32 room for a batch's sum.
MAX_WEIGHT_MARGIN = 50.0


def check_weight_margin(option: str, value: float | None) -> None:
    """Refuse a margin that would turn the weights ``exp(margin - entropy)`` infinite
    (``inf`` to switch a filter off, or a huge value): the loss, then the model, NaN."""
    if value is not None and not (math.isfinite(value) and value <= MAX_WEIGHT_MARGIN):
        raise ValueError(
            f"{option}={value!r} weights each sample by exp({option} - entropy), which overflows (a NaN loss "
            f"and model); entropies are at most ln(num_classes) (6.9 for 1000 classes), so a {option} of "
            f"ln(num_classes) already keeps every sample: use a finite value <= {MAX_WEIGHT_MARGIN:g}"
        )


def cross_entropy_to(logits: Tensor, target: Tensor) -> Tensor:
    """Per row ``-sum softmax(target) log_softmax(logits)``: the cross-entropy of a
    prediction against another one (CoTTA's student against its teacher). Gradients
    flow into both; detach ``target`` for a fixed one."""
    return -(target.float().softmax(1) * logits.float().log_softmax(1)).sum(1)


def symmetric_cross_entropy(a: Tensor, b: Tensor) -> Tensor:
    """Per row, the mean of both directions of :func:`cross_entropy_to` (RMT's and
    ROID's consistency loss, CoTTA's ImageNet loss)."""
    return 0.5 * cross_entropy_to(a, b) + 0.5 * cross_entropy_to(b, a)


def soft_likelihood_ratio(logits: Tensor, clip: float = 0.99, eps: float = 1e-5) -> Tensor:
    """Per row ``-sum q log(q / (1 - q) + eps)`` with ``q = min(softmax, clip)``:
    ROID's self-training loss. Unlike entropy its gradient does not vanish for
    confident predictions, and the clip stops it at ``clip``."""
    q = logits.float().softmax(1).clamp(max=clip)
    return -(q * (q / (1 - q) + eps).log()).sum(1)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the average prediction over views: logits (..., k, classes) ->
    (...,). TPT's loss: ``-sum p̄ log p̄`` with ``p̄ = mean_k softmax(logits)``,
    computed in log space in float32."""
    log_p = logits.float().log_softmax(dim=-1)
    log_mean = log_p.logsumexp(dim=-2) - math.log(logits.shape[-2])
    return -(log_mean.exp() * log_mean).sum(dim=-1)
