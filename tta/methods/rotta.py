"""``rotta``: robust test-time adaptation in dynamic scenarios (Yuan, Xie, Li, CVPR 2023).

For streams whose labels are correlated in time. Robust BatchNorm (RBN): BatchNorm
layers normalise with global statistics, started at the source ones and moved by an
exponential moving average of the memory batches' statistics. A category-balanced
memory (CSTU) keeps the test images, under their teacher pseudo-labels, by timeliness
and uncertainty. Every ``update_frequency`` test images the student learns the mean
teacher's predictions on the memory (student on a strong augmentation, teacher on
the raw images), weighted by the images' age; the teacher predicts the stream.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._checks import check_positive_int
from ..augment.kornia_views import check_transform, cotta_augmentation
from .base import TTAMethod
from .entropy import cross_entropy_to
from .inputs import refuse_if_wrapped
from .norm_layers import batchnorm_layers, swap_forward, weighted_stats
from .records import RoTTARecord, StepRecord
from .registry import register_method
from .teacher import ema_update_, frozen_copy

__all__ = ["RoTTA", "use_robust_bn", "robust_bn_update", "cstu_add_", "cstu_priority"]


# -- Robust BatchNorm ------------------------------------------------------------------
def _batch_stats(x: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but 1, in float32; with
    ``weight`` (0/1 per image) over the images it selects only (the memory's free slots)."""
    if weight is None:
        var, mean = torch.var_mean(x.float(), dim=[0, *range(2, x.dim())], correction=0)
        return mean, var
    if weight.shape[0] != x.shape[0]:  # BatchNorm over tokens: each image owns equal rows
        weight = weight.repeat_interleave(x.shape[0] // weight.shape[0])
    return weighted_stats(x, weight)


def _robust_bn_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    if not self.tta_update:
        # Prediction: the stored (global) statistics, as eval-mode BatchNorm.
        out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    else:
        # Training pass: mix the stored statistics with the batch's, keep the mix
        # (detached) as the new global statistics, and normalise with it; the
        # gradient flows through the batch part.
        a = self.tta_alpha
        mean_b, var_b = _batch_stats(x, self.tta_weight)
        mean = (1 - a) * self.running_mean.float() + a * mean_b
        var = (1 - a) * self.running_var.float() + a * var_b
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out = (x - mean.view(shape).to(x.dtype)) * scale.view(shape).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.view(shape).to(x.dtype)
    return out


def use_robust_bn(model: nn.Module, alpha: float) -> int:
    """Make every BatchNorm layer of ``model`` a Robust BatchNorm: its running
    statistics (the source ones at first) become RoTTA's global statistics. The class
    of each layer is swapped for a subclass in place (state-dict keys unchanged, the
    statistics stay in ``running_mean``/``running_var``). Returns the layers changed."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"rbn_alpha must be in [0, 1], got {alpha}")
    layers = batchnorm_layers(model, needing_running_stats="Robust BatchNorm starts from (a model built with "
                                                           "track_running_stats=True has them)")
    for _, module in layers:
        swap_forward(module, _robust_bn_forward, "Robust")
        module.tta_alpha, module.tta_update, module.tta_weight = float(alpha), False, None
    return len(layers)


@contextmanager
def robust_bn_update(*models: nn.Module, weight: Tensor | None = None) -> Iterator[None]:
    """Within the block the Robust BatchNorm layers of ``models`` train: they
    normalise with the mix of global and batch statistics and move the global ones
    (the official code's ``model.train()``; other layers, dropout, stay as they are).
    ``weight`` (0/1 per image) leaves the zero-weighted images out of the statistics."""
    layers = [m for model in models for m in model.modules() if hasattr(m, "tta_update")]
    for m in layers:
        m.tta_update, m.tta_weight = True, weight
    try:
        yield
    finally:
        for m in layers:
            m.tta_update, m.tta_weight = False, None


# -- the memory bank (CSTU) -------------------------------------------------------------
def cstu_priority(age: Tensor, uncertainty: Tensor, capacity: int, num_classes: int,
                  lambda_t: float, lambda_u: float) -> Tensor:
    """The eviction priority ``lambda_t * sigmoid(age / N) + lambda_u * U / ln C``
    (float64, as the official code's Python floats; float32 on MPS)."""
    dtype = torch.float32 if age.device.type == "mps" else torch.float64
    return (lambda_t * torch.sigmoid(age.to(dtype) / capacity)
            + lambda_u * uncertainty.to(dtype) / math.log(num_classes))


_AGE_SPAN = 2 ** 40  # > any age: orders ties by class, then age, in one integer key


def cstu_add_(labels: Tensor, uncertainty: Tensor, age: Tensor, valid: Tensor, label: Tensor,
              new_uncertainty: Tensor, *, num_classes: int, lambda_t: float = 1.0,
              lambda_u: float = 1.0) -> Tensor:
    """Offer one image (pseudo-label ``label``, entropy ``new_uncertainty``, 0-dim
    tensors) to the bank whose N slots are described by ``labels``, ``uncertainty``,
    ``age`` and ``valid`` (updated in place). Returns the slot it was written to
    (0-dim), or N if it was rejected. No host sync: every decision is a tensor.

    The official rule (``CSTU.add_instance``): while the image's class holds fewer than
    N / C images it takes free space, or in a full bank the place of the stored image
    of highest priority among the classes holding the most images; a class at its
    share can only swap one of its own. A swap needs that priority strictly above the
    newcomer's (age 0); ties go to the last in the official scan order (classes
    ascending, oldest first): the highest class, then the youngest. Then every stored
    image ages by one, the newcomer included. (The official "no candidate: accept"
    cannot occur: a class at its share, or a full bank, has images to compare with.)
    """
    n = labels.shape[0]
    occupied = valid.long()
    counts = torch.zeros(num_classes, dtype=torch.long, device=labels.device).index_add_(0, labels, occupied)
    under_share = counts.gather(0, label.view(1)).squeeze(0) < n / num_classes
    into_free_space = under_share & (occupied.sum() < n)
    candidates = valid & torch.where(under_share, counts[labels] == counts.max(), labels == label)
    priority = cstu_priority(age, uncertainty, n, num_classes, lambda_t, lambda_u)
    priority = priority.masked_fill(~candidates, -math.inf)
    top = priority.max()
    newcomer = lambda_t * 0.5 + lambda_u * new_uncertainty.to(priority.dtype) / math.log(num_classes)
    swaps = ~into_free_space & (top > newcomer)
    order = torch.where(priority == top, labels * _AGE_SPAN - age, torch.iinfo(torch.long).min)
    slot = torch.where(swaps, order.argmax(), (~valid).int().argmax())  # argmax: the first free slot
    accepted = into_free_space | swaps
    write = (torch.arange(n, device=labels.device) == slot) & accepted
    labels.copy_(torch.where(write, label, labels))
    uncertainty.copy_(torch.where(write, new_uncertainty.to(uncertainty.dtype), uncertainty))
    age.copy_(torch.where(write, 0, age))
    valid.logical_or_(write)
    age.add_(valid.long())
    return torch.where(accepted, slot, n)


@register_method("rotta")
class RoTTA(TTAMethod):
    """RoTTA. Defaults are the official code's CIFAR-10-C setting (BIT-DA/RoTTA
    configs/adapter/rotta.yaml): Adam, lr 1e-3, memory of 64 images, an update every
    64 images, teacher EMA ``nu`` 0.001, RBN momentum 0.05, ``lambda_t = lambda_u = 1``.

    Each batch: the teacher predicts it with its stored statistics (the output; the
    memory's pseudo-labels and entropies come from the same pass); its images enter
    the memory one by one, and after every ``update_frequency``-th image of the
    stream (a global count, so possibly mid-batch) one update runs on the memory:
    teacher on the raw images, student on ``transform`` of them, both with their RBN
    layers training (the only time statistics move); loss ``mean_i sigmoid(-age_i /
    N) * CE(softmax(teacher_i), student_i)``; an optimiser step; the teacher's EMA.
    BatchNorm models adapt the BatchNorm affines; GroupNorm/LayerNorm models their
    norm affines (as mariodoebler/test-time-adaptation does), with no statistics.

    Args:
        memory_size: images the memory holds (N).
        update_frequency: one update every this many test images.
        teacher_momentum: the teacher's EMA momentum (1 - the paper's ``nu``).
        rbn_alpha: the weight of the batch statistics in each RBN update (alpha).
        lambda_t: weight of the age (timeliness) in the eviction priority.
        lambda_u: weight of the entropy (uncertainty) in the eviction priority.
        transform: the student's strong augmentation, a module on (N, 3, H, W)
            batches in [0, 1] (default: CoTTA's, :func:`~tta.augment.kornia_views.cotta_augmentation`).

    Differences from the official code: the augmentation draws its parameters per
    image (the official transform draws one set for the whole memory batch, all but
    the pixel noise); the memory batch is always the N slots, free ones weighted out
    of the statistics and the loss (the numbers of stacking the stored images, with
    no host sync); an update switches only the RBN layers to training (dropout stays
    off); the EMA skips the teacher's frozen weights (equal to the student's).
    mariodoebler/test-time-adaptation's float32 path calls ``loss_calculation(x)`` on
    a method that takes no argument (a ``TypeError`` at the first update); this
    follows the authors' code: updates from the memory alone.

    Presets: ``"cifar10"`` and ``"imagenet"`` are both these defaults
    (mariodoebler/test-time-adaptation cfgs/cifar10_c/rotta.yaml, batch 200, and
    cfgs/imagenet_c/rotta.yaml, batch 64: Adam, lr 1e-3, betas (0.9, 0.999), no
    weight decay); the batch size is the benchmark's.
    """

    batch_stats = False  # RBN configures the BatchNorm layers itself
    record_type = RoTTARecord
    updated_copies = ("teacher",)
    presets = {"cifar10": {}, "imagenet": {}}

    def __init__(
        self,
        model: nn.Module,
        *,
        memory_size: int = 64,
        update_frequency: int = 64,
        teacher_momentum: float = 0.999,
        rbn_alpha: float = 0.05,
        lambda_t: float = 1.0,
        lambda_u: float = 1.0,
        transform: nn.Module | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        check_positive_int(memory_size, "memory_size")
        check_positive_int(update_frequency, "update_frequency")
        if not 0.0 <= teacher_momentum <= 1.0:
            raise ValueError(f"teacher_momentum must be in [0, 1], got {teacher_momentum}")
        check_transform(transform)
        refuse_if_wrapped(model)  # before the BatchNorm layers change
        use_robust_bn(model, rbn_alpha)
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.memory_size, self.update_frequency = memory_size, update_frequency
        self.teacher_momentum, self.rbn_alpha = teacher_momentum, rbn_alpha
        self.lambda_t, self.lambda_u = lambda_t, lambda_u
        self.transform = transform if transform is not None else cotta_augmentation()
        # The teacher: a copy of the RBN model with its own global statistics.
        self.teacher = frozen_copy(self.model)
        teacher_params = dict(self.teacher.named_parameters())
        self._ema_pairs = [(teacher_params[name], p) for name, p in self.adapted]

        # The memory: N slots (images from the first batch on), pseudo-label, entropy,
        # age, whether the slot is taken.
        device = next(iter(model.parameters()), torch.empty(0)).device
        self.register_buffer("mem_images", torch.zeros(0, device=device))
        for name, dtype in (("labels", torch.long), ("uncertainty", torch.float32), ("age", torch.long),
                            ("valid", torch.bool)):
            self.register_buffer(f"mem_{name}", torch.zeros(memory_size, dtype=dtype, device=device))
        # Test images seen (the official current_instance): where a batch's updates fall.
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, recurse: bool = True):
        # The counter stays on the CPU: reading it each batch would otherwise sync the device.
        counter = self._buffers["num_seen"]
        super()._apply(fn, recurse)
        self._buffers["num_seen"] = counter
        return self

    # -- the step ------------------------------------------------------------------------
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        self._prepare_memory(x)
        with torch.no_grad():
            logits = self.teacher(x)
            probs = logits.float().softmax(1)
            labels = probs.argmax(1)
            entropy = -(probs * torch.log(probs + 1e-6)).sum(1)  # the official +1e-6
        num_classes, batch, seen = logits.shape[1], x.shape[0], int(self.num_seen)
        slots = torch.empty(batch, dtype=torch.long, device=x.device)
        losses, start = [], 0
        # Sequential by definition (each image's fate depends on those before): a loop over
        # the batch on the (N,) bookkeeping tensors, no host sync (images are copied once per
        # update). About 45 small ops an image: 0.17 ms on one CPU thread, 34 ms a batch of
        # 200 (under 2% of a ResNet-20 step); Python lists as in the official code take 0.013
        # ms an image (C = 10) but need the pseudo-labels on the host, a device sync a batch.
        for i in range(batch):
            slots[i] = cstu_add_(self.mem_labels, self.mem_uncertainty, self.mem_age, self.mem_valid,
                                 labels[i], entropy[i], num_classes=num_classes,
                                 lambda_t=self.lambda_t, lambda_u=self.lambda_u)
            if (seen + i + 1) % self.update_frequency == 0:
                self._store_images(x, slots, start, i + 1)
                start = i + 1
                losses.append(self._update())
        self._store_images(x, slots, start, batch)
        self.num_seen.fill_(seen + batch)
        record = RoTTARecord(
            num_samples=batch, num_selected=(slots < self.memory_size).sum(),
            loss=torch.stack(losses).mean() if losses else None,
            num_updates=len(losses), memory_occupancy=self.mem_valid.sum(),
        )
        return logits, record

    def _prepare_memory(self, x: Tensor) -> None:
        shape = (self.memory_size, *x.shape[1:])
        if self.mem_images.dim() == 1:  # before the first batch (or after a reset)
            self.mem_images = x.new_zeros(shape)
        elif self.mem_images.shape != shape:
            raise ValueError(f"rotta: the memory holds images of shape {tuple(self.mem_images.shape[1:])}, "
                             f"this batch has {tuple(x.shape[1:])}; a stream needs one image size")

    @torch.no_grad()
    def _store_images(self, x: Tensor, slots: Tensor, start: int, stop: int) -> None:
        """Copy images ``start:stop`` of the batch into the slots the bank gave them;
        where one slot took several, the last one stays (the others were evicted)."""
        if stop <= start:
            return
        n = self.memory_size
        source = torch.full((n + 1,), -1, dtype=torch.long, device=x.device)
        source.scatter_reduce_(0, slots[start:stop], torch.arange(start, stop, device=x.device), "amax")
        source = source[:n]
        written = (source >= 0).view(n, *([1] * (x.dim() - 1)))
        self.mem_images.copy_(torch.where(written, x[source.clamp_min(0)].to(self.mem_images.dtype),
                                          self.mem_images))

    def _update(self) -> Tensor:
        """One training step on the memory (the official ``update_model``)."""
        stored = self.mem_valid.float()  # never all zero: the first image is always accepted
        images = self.mem_images
        with robust_bn_update(self.model, self.teacher, weight=stored):
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            student_logits = self.model(self.transform(images))
        timeliness = torch.sigmoid(-self.mem_age.float() / self.memory_size)  # e^-a / (1 + e^-a)
        loss = cross_entropy_to(student_logits, teacher_logits)
        loss = (loss * timeliness * stored).sum() / stored.sum()
        self.backward(loss)
        self.step()
        with torch.no_grad():
            ema_update_([t for t, _ in self._ema_pairs], [s for _, s in self._ema_pairs], self.teacher_momentum)
        return loss.detach()
