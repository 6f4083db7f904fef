"""``lame``: Laplacian-adjusted maximum-likelihood estimation (Boudiaf et al.,
"Parameter-free Online Test-time Adaptation", CVPR 2022).

Nothing adapts: the source model (its own BatchNorm statistics) predicts, and LAME
corrects only its outputs, batch by batch. Each batch's assignments ``Y`` (N, K)
minimise ``sum_i KL(y_i || p_i) - lambda * sum_ij w_ij y_i . y_j``: stay close to
the model's probabilities ``p`` while agreeing with the images whose features are
near (the affinity ``W`` over the L2-normalised pooled features). The bound
(concave-convex) iterations are ``Y <- softmax(log p + lambda * W @ Y)``, stopped
when the energy stops changing; no state is kept between batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from .base import TTAMethod
from .features import check_feature_split, features_and_logits
from .records import LAMERecord
from .registry import register_method

__all__ = ["LAME", "lame_affinity", "laplacian_optimization"]

AFFINITIES = ("knn", "rbf", "linear")


def lame_affinity(features: Tensor, kind: str = "knn", knn: int = 5, force_symmetry: bool = False) -> Tensor:
    """The affinity (N, N) of L2-normalised ``features`` (N, D), as the official code
    builds it.

    - ``"knn"``: ``w_ij = 1`` for the ``knn`` nearest other images j of image i
      (Euclidean distance), else 0; not symmetric (each row sums to ``min(knn, N-1)``).
    - ``"rbf"``: ``exp(-d_ij^2 / (2 sigma^2))``, one ``sigma`` per batch: the mean over
      the images of the distance to their ``knn``-th nearest image, the image itself
      counted (so ``knn=5`` is the 4th other image). Dense, diagonal 1.
    - ``"linear"``: cosine similarities ``f_i . f_j``, dense, diagonal 1.

    ``force_symmetry`` replaces ``W`` by ``(W + W^T) / 2``."""
    kind = kind.lower()
    n = features.shape[0]
    if kind == "linear":
        w = features @ features.t()
    else:
        # Exact pairwise differences (not the |a|^2 + |b|^2 - 2ab expansion, whose
        # rounding leaves the diagonal above 0 and can reorder near neighbours).
        dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
        if kind == "knn":
            # The official code takes the k+1 nearest and drops the first, taken to
            # be the image itself; excluding the diagonal says so (it differs only
            # for exact duplicates, where the first may be the other copy).
            k = min(knn, n - 1)
            eye = torch.eye(n, dtype=torch.bool, device=features.device)
            index = dist.masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
            w = torch.zeros_like(dist).scatter_(1, index, 1.0)
        elif kind == "rbf":
            kth = dist.topk(min(knn, n), dim=1, largest=False).values[:, -1]
            # All features equal (sigma 0) would give 0/0: the official NaN becomes W = 1.
            sigma = kth.mean().clamp_min(1e-12)
            w = torch.exp(-dist.square() / (2 * sigma.square()))
        else:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {kind!r}")
    return (w + w.t()) / 2 if force_symmetry else w


def laplacian_optimization(
    unary: Tensor, kernel: Tensor, bound_lambda: float = 1.0, max_steps: int = 100, tolerance: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """LAME's bound iterations: ``Y <- softmax(-unary + lambda * kernel @ Y)`` from
    ``Y = softmax(-unary)``, stopped after the first update (from the third on) whose
    energy ``E = sum(unary * Y - lambda * P * Y + Y log Y)`` (``P = lambda * kernel @ Y``
    of the update) is within ``tolerance`` (relative) of the previous update's.
    Returns ``Y`` (N, K) and the number of updates made, a 0-dim device tensor.

    The official code reads ``E`` to the host after every update to decide whether
    to stop. Here all ``max_steps`` updates run and the stop is a mask: once stopped,
    ``Y`` is left as it is. The result is the same ``Y`` with no host sync: a sync per
    update would stall the device queue 100 times a batch (the model's forward
    included, the first time), whereas the extra updates are an [N, N] x [N, K]
    product each (measured on the CPU, 1 thread: the 100 updates at N = 200, K = 10
    take a few milliseconds against a ResNet-20 forward of ~0.2 s)."""
    y = (-unary).softmax(dim=1)
    # The energies are compared in float64, as the official code compares them (on
    # the host, as Python floats).
    old_energy = torch.full((), float("inf"), device=unary.device, dtype=torch.float64)
    stopped = torch.zeros((), dtype=torch.bool, device=unary.device)
    updates = torch.zeros((), dtype=torch.long, device=unary.device)
    for i in range(max_steps):
        pairwise = bound_lambda * (kernel @ y)
        new_y = (pairwise - unary).softmax(dim=1)
        energy = (unary * new_y - bound_lambda * pairwise * new_y
                  + new_y * new_y.clamp_min(1e-20).log()).sum().double()
        y = torch.where(stopped, y, new_y)
        updates = updates + (~stopped).long()
        if i > 1:
            stopped = stopped | ((energy - old_energy).abs() <= tolerance * old_energy.abs())
        old_energy = energy
    return y, updates


@register_method("lame")
class LAME(TTAMethod):
    """LAME: the source model's outputs corrected within each batch by the
    features' neighbourhood (Laplacian regularisation); no parameter or statistic
    changes. Returns ``log Y`` (logits whose softmax is LAME's assignment ``Y``).

    Defaults: ``affinity="knn"`` with ``knn=5``, not the official ``"rbf"``: the RBF
    kernel is dense, so at batch 200 each row sums over the whole batch (mean row
    sum ~40-60 on ResNet-20 features, against unary margins of a few nats) and the
    fixed point puts nearly the whole batch in one or two classes (89.3 % error on
    the 8-corruption CIFAR-10-C stream; ~90 % even on clean images); the kNN row
    adds at most ``knn`` nats of neighbour votes and stays near the source model
    (65.0 %). RBF is tuned for the official batch 16 and for non-i.i.d. streams,
    where pulling a batch toward its dominant class is what helps; choose it there.

    Args:
        affinity: the kernel on the L2-normalised features: ``"knn"``, ``"rbf"`` or
            ``"linear"`` (see :func:`lame_affinity`).
        knn: neighbours per image of ``"knn"``; for ``"rbf"``, which neighbour's
            distance (the image itself counted) sets the kernel width.
        force_symmetry: symmetrise the affinity, ``(W + W^T) / 2``.
        bound_lambda: weight of the Laplacian (pairwise) term.
        max_steps: bound iterations at most.
        tolerance: stop when the energy changes by at most this fraction.

    Needs the model's features and last layer (:mod:`tta.methods.features`: every
    ``tta.load_model`` image model, timm network, distilled two-head ones too, and
    network that ends with an ``nn.Linear``). The official ``SIGMA`` setting
    is not an option: none of the official kernels reads it.

    Presets: ``"cifar10"`` and ``"imagenet"`` are mariodoebler/test-time-adaptation's
    cfgs/{cifar10_c,imagenet_c}/lame.yaml (= the official defaults): ``affinity="rbf"``,
    ``knn=5``, no symmetry (batch 200 and 64 there; the official LAME runs batch 16).
    """

    batch_stats = False
    has_optimizer = False
    record_type = LAMERecord
    presets = {"cifar10": {"affinity": "rbf"}, "imagenet": {"affinity": "rbf"}}

    def __init__(
        self,
        model: nn.Module,
        *,
        affinity: str = "knn",
        knn: int = 5,
        force_symmetry: bool = False,
        bound_lambda: float = 1.0,
        max_steps: int = 100,
        tolerance: float = 1e-8,
        **kwargs,
    ) -> None:
        if not isinstance(affinity, str) or affinity.lower() not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
        check_positive_int(knn, "knn")
        check_positive_int(max_steps, "max_steps")
        check_feature_split(model, "lame")
        super().__init__(model, **kwargs)
        self.affinity, self.knn, self.force_symmetry = affinity.lower(), knn, force_symmetry
        self.bound_lambda, self.max_steps, self.tolerance = bound_lambda, max_steps, tolerance

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, LAMERecord]:
        features, logits = features_and_logits(self.model, x)
        with torch.autocast(x.device.type, enabled=False):
            logits, features = logits.float(), features.float()
            unary = -torch.log(logits.softmax(dim=1) + 1e-10)
            kernel = lame_affinity(F.normalize(features, p=2, dim=1), self.affinity, self.knn,
                                   self.force_symmetry)
            y, updates = laplacian_optimization(unary, kernel, self.bound_lambda, self.max_steps, self.tolerance)
            out = y.clamp_min(torch.finfo(y.dtype).tiny).log()
        changed = (out.argmax(dim=1) != logits.argmax(dim=1)).sum()
        record = LAMERecord(num_samples=x.shape[0], num_selected=0, iterations=updates, num_changed=changed)
        return out, record
