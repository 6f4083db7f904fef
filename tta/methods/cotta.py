"""``cotta``: continual test-time adaptation (Wang et al., CVPR 2022).

Every weight and bias adapts, toward a weight-averaged mean teacher: the student
learns the teacher's prediction (cross-entropy), the teacher follows the student by
an exponential moving average, and every adapted weight is restored to its source
value with a small probability at each step. When the source model is unsure of the
batch (mean confidence below ``confidence_threshold``) the teacher predicts by
averaging over ``num_views`` augmented views of each image; the teacher's prediction
is also what the method reports.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from ..augment.kornia_views import check_transform, cotta_augmentation, stack_views
from .base import TTAMethod
from .entropy import cross_entropy_to, symmetric_cross_entropy
from .norm_layers import grouped_batch_stats
from .params import select_weights_and_biases
from .records import CoTTARecord, StepRecord
from .registry import register_method
from .teacher import ema_update_, frozen_copy, stochastic_restore_


@register_method("cotta")
class CoTTA(TTAMethod):
    """CoTTA. Defaults are the paper's CIFAR setting (its official code's
    cfgs/cifar10: Adam, lr 1e-3, teacher momentum 0.999, restore probability 0.01,
    confidence threshold 0.92, 32 views).

    Args:
        teacher_momentum: the mean teacher's EMA momentum.
        restore_prob: probability that a weight is reset to its source value at
            each step (stochastic restore; 0 turns it off).
        confidence_threshold: the teacher averages its augmented views when the
            source model's mean max-probability on the batch is below this (the
            paper's ``p_th``; 0 never averages, 1 always).
        num_views: augmented views the teacher averages.
        transform: the view augmentation, a module on (N, 3, H, W) batches in
            [0, 1], e.g. a ``kornia.augmentation`` pipeline (default:
            :func:`~tta.augment.kornia_views.cotta_augmentation`, which draws per
            image; the official code draws once per view for the whole batch:
            ``cotta_augmentation(same_on_batch=True)``, which gives its figure).
        views_per_forward: how many views the teacher takes in one forward, each
            view's images normalised with that view's statistics as separate
            forwards would. ``None``: all at once on a GPU; on the CPU as many as
            make about 256 images (a batch past the caches is slower per image:
            32 views of 200 CIFAR images, ResNet-20, 1 thread, took 21.3 s in one
            forward and 7.8 s in 32). A lower cap saves GPU memory at large images.
        symmetric_loss: the symmetric cross-entropy of the official ImageNet code.

    Presets: ``"cifar10"`` is these defaults (mariodoebler/test-time-adaptation,
    cfgs/cifar10_c/cotta.yaml, batch 200); ``"imagenet"`` its ImageNet-C setting:
    SGD (momentum 0.9, Nesterov) lr 0.01, restore probability 0.001, threshold 0.1,
    symmetric loss, batch 64.
    """

    adapts_norm_params = False
    record_type = CoTTARecord
    updated_copies = ("teacher",)
    presets = {
        "cifar10": {},
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "restore_prob": 0.001,
                     "confidence_threshold": 0.1, "symmetric_loss": True},
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        teacher_momentum: float = 0.999,
        restore_prob: float = 0.01,
        confidence_threshold: float = 0.92,
        num_views: int = 32,
        transform: nn.Module | None = None,
        views_per_forward: int | None = None,
        symmetric_loss: bool = False,
        optimizer: str = "adam",
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        if not 0.0 <= teacher_momentum <= 1.0 or not 0.0 <= restore_prob <= 1.0:
            raise ValueError(f"teacher_momentum and restore_prob must be in [0, 1], got {teacher_momentum}, "
                             f"{restore_prob}")
        # Integers: the views are counted out in a range() at the first unsure batch.
        check_positive_int(num_views, "num_views")
        check_positive_int(views_per_forward, "views_per_forward", optional=True)
        check_transform(transform)
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.teacher_momentum, self.restore_prob = teacher_momentum, restore_prob
        self.confidence_threshold, self.num_views = confidence_threshold, num_views
        self.views_per_forward = views_per_forward
        self.symmetric_loss = symmetric_loss
        self.transform = transform if transform is not None else cotta_augmentation()
        # Copies of the configured model (test-batch statistics): the teacher starts
        # at the source and follows the student; the anchor stays the source.
        self.teacher = frozen_copy(self.model)
        self.anchor = frozen_copy(self.model)

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        # The official code's: every parameter named weight or bias (a ViT's class
        # token and position embedding stay frozen, and are never restored).
        return select_weights_and_biases(self.model)

    @torch.no_grad()
    def teacher_prediction(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's logits on ``x``, averaged over augmented views when the
        source model is unsure of the batch; and whether it averaged."""
        confidence = self.anchor(x).float().softmax(1).amax(1).mean()
        averaged = confidence < self.confidence_threshold
        # One host sync, on purpose: it decides whether to run the views' forward,
        # which costs num_views forwards (on ImageNet-C, threshold 0.1, it rarely
        # runs); computing both branches to select without a sync would always pay it.
        if not bool(averaged):
            return self.teacher(x), averaged
        per_forward = self.views_per_forward or (
            self.num_views if x.device.type != "cpu" else max(1, 256 // x.shape[0]))
        total: Tensor | None = None
        for start in range(0, self.num_views, per_forward):
            views = min(per_forward, self.num_views - start)
            with grouped_batch_stats(self.teacher, groups=views):
                out = self.teacher(stack_views(x, views, self.transform)).float()
            out = out.view(views, x.shape[0], -1).sum(0)
            total = out if total is None else total + out
        return total / self.num_views, averaged

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        teacher_logits, averaged = self.teacher_prediction(x)
        loss = (symmetric_cross_entropy(logits, teacher_logits) if self.symmetric_loss
                else cross_entropy_to(logits, teacher_logits)).mean()
        self.backward(loss)
        self.step()
        ema_update_(self.teacher.parameters(), self.model.parameters(), self.teacher_momentum)
        stochastic_restore_([p for _, p in self.adapted], self.source_params(), self.restore_prob)
        record = CoTTARecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss.detach(), averaged=averaged)
        return teacher_logits, record
