"""``rmt``: robust mean teacher for continual test-time adaptation (Döbler et al.,
CVPR 2023).

Every weight and bias adapts. A mean teacher (an exponential moving average of the
student's weights) gives the targets of a symmetric cross-entropy on the test batch
and on an augmented copy; a contrastive loss pulls the features of both toward the
nearest class prototype of the source data; and a batch of labelled source images is
replayed at every step (cross-entropy). Before the first test batch, the student
and teacher warm up on source images (the symmetric cross-entropy, learning rate
ramped up linearly). The prediction is the sum of the student's and the teacher's
logits.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment.kornia_views import check_transform, cotta_augmentation
from .base import TTAMethod
from .entropy import symmetric_cross_entropy
from .features import features_and_logits
from .inputs import to_model_input
from .params import select_weights_and_biases
from .prototypes import (attach_prototypes, check_prototype_options, prototype_contrastive_loss,
                         SourceStream)
from .records import RMTRecord, StepRecord
from .registry import register_method
from .teacher import ema_update_, frozen_copy


@register_method("rmt")
class RMT(TTAMethod):
    """RMT. Defaults are the official code's CIFAR-10-C setting
    (mariodoebler/test-time-adaptation, conf.py and cfgs/cifar10_c/rmt.yaml: Adam,
    lr 1e-3, teacher momentum 0.999, every loss weight 1, warm-up on 50,000 source
    images, prototypes of up to 100,000, projector width 128, temperature 0.1).

    Args:
        source_loader: the labelled source images, an iterable (iterated again and
            again) of (images in [0, 1] on the model's device, labels) batches; tta-bench
            passes :class:`~tta.bench.source_data.SourceBatches` of ``data.source_root``.
            Required: the prototypes, the warm-up and the replay learn from it.
        teacher_momentum: the mean teacher's EMA momentum (over all parameters).
        lambda_ce_trg: weight of the self-training loss (symmetric cross-entropy to
            the teacher, on the test batch and its augmented copy).
        lambda_cont: weight of the contrastive loss toward the source prototypes.
        lambda_ce_src: weight of the cross-entropy on one replayed source batch per
            step (0: no replay, the official "source-free" variant; the prototypes
            and the warm-up still use source images).
        num_warmup_images: source images of the warm-up, done once when wrapping:
            ``num_warmup_images // batch size`` steps (0 skips it).
        num_prototype_images: source images the class prototypes average (whole
            batches until more than this many; the default covers all of CIFAR-10).
        projection_dim: width of the projector the contrastive loss compares in.
        temperature: the temperature of the contrastive loss (SupCon's tau).
        transform: the view augmentation, a module on (B, 3, H, W) batches in [0, 1]
            (default: :func:`~tta.augment.kornia_views.cotta_augmentation`).

    ``reset()`` returns to the state after the warm-up (student, teacher, projector,
    optimizer); the replay goes on with the loader's next batch, as in the official
    code. The number of source batches read is part of the state: a loaded
    checkpoint replays on from there (passes passed over whole are only started, so
    a loader that orders each pass by its count, as tta-bench's does, gives the same
    batches). A ``copy.deepcopy`` shares the loader and reads it afresh to the same
    count: exact for a loader that repeats its passes.

    Presets: ``"cifar10"`` is these defaults (batch 200); ``"imagenet"`` the
    ImageNet-C setting (cfgs/imagenet_c/rmt.yaml): SGD (momentum 0.9, Nesterov)
    lr 0.01, batch 64.
    """

    adapts_norm_params = False
    record_type = RMTRecord
    updated_copies = ("teacher",)
    trains_while_built = True  # the warm-up
    presets = {"cifar10": {}, "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True}}

    def __init__(
        self,
        model: nn.Module,
        *,
        source_loader: Iterable | None = None,
        teacher_momentum: float = 0.999,
        lambda_ce_trg: float = 1.0,
        lambda_cont: float = 1.0,
        lambda_ce_src: float = 1.0,
        num_warmup_images: int = 50000,
        num_prototype_images: int = 100000,
        projection_dim: int = 128,
        temperature: float = 0.1,
        transform: nn.Module | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        check_prototype_options(model, "rmt", source_loader, "for its prototypes, warm-up and replay",
                                loss_weights=(lambda_ce_trg, lambda_cont, lambda_ce_src),
                                num_prototype_images=num_prototype_images, projection_dim=projection_dim,
                                temperature=temperature)
        if not 0.0 <= teacher_momentum <= 1.0 or num_warmup_images < 0:
            raise ValueError(f"teacher_momentum must be in [0, 1] and num_warmup_images >= 0, got "
                             f"{teacher_momentum}, {num_warmup_images}")
        check_transform(transform)
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.teacher_momentum = teacher_momentum
        self.lambda_ce_trg, self.lambda_cont, self.lambda_ce_src = lambda_ce_trg, lambda_cont, lambda_ce_src
        self.temperature = temperature
        self.transform = transform if transform is not None else cotta_augmentation()
        # The teacher is a copy of the configured student (test-batch statistics).
        self.teacher = frozen_copy(self.model)
        attach_prototypes(self, source_loader, num_prototype_images, projection_dim)
        # One endless stream of source batches serves the warm-up, then the replay;
        # how many it has given is part of the state (a resumed run replays on
        # from there)
        self._source, self._keep_source_position = SourceStream(source_loader, "rmt"), False
        self.warm_up(num_warmup_images // self._source.peek()[0].shape[0])
        self.snapshot()  # reset() returns here, after the warm-up

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        # The official code's: every parameter named weight or bias (a ViT's class
        # token and position embedding stay frozen).
        return select_weights_and_biases(self.model)

    def reset(self) -> None:
        # The replay goes on where it is, as the official code's loader iterator does.
        self._keep_source_position = True
        try:
            super().reset()
        finally:
            self._keep_source_position = False

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "source_batches_read": self._source.read}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        read = int(state.get("source_batches_read", self._source.read))
        if read != self._source.read and not self._keep_source_position:
            if read < self._source.read:  # back: read the loader afresh to there
                self._source = SourceStream(self._source.loader, "rmt")
            self._source.advance(read - self._source.read)

    def next_source_batch(self) -> tuple[Tensor, Tensor]:
        """The next replayed source batch, ready for the model."""
        images, labels = next(self._source)
        param = next(self.model.parameters())
        images = to_model_input(images, self.model, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(param.device, torch.long, non_blocking=True)

    def warm_up(self, steps: int) -> None:
        """Train student and teacher on ``steps`` source batches, without labels:
        the student learns the teacher's prediction (symmetric cross-entropy), the
        teacher follows by EMA, every learning rate ramps up linearly to its value."""
        if steps <= 0:
            return
        final = [group["lr"] for group in self.optimizer.param_groups]
        with torch.enable_grad(), self.logits_only():
            for i in range(steps):
                for group, lr in zip(self.optimizer.param_groups, final):
                    group["lr"] = lr * (i + 1) / steps
                images, _ = self.next_source_batch()
                loss = symmetric_cross_entropy(self.model(images), self.teacher(images).detach()).mean()
                self.backward(loss)
                self.step()
                ema_update_(self.teacher.parameters(), self.model.parameters(), self.teacher_momentum)
        for group, lr in zip(self.optimizer.param_groups, final):
            group["lr"] = lr

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        features, logits = features_and_logits(self.model, x)
        aug_features, aug_logits = features_and_logits(self.model, self.transform(x))
        # The teacher's weights take no gradient and x none either, so no graph is
        # built; grad mode stays on for the fused BatchNorm kernel.
        teacher_logits = self.teacher(x).detach()

        contrastive = prototype_contrastive_loss(self.projector, self.prototypes, features, aug_features,
                                                 self.temperature)
        self_training = (0.5 * symmetric_cross_entropy(logits, teacher_logits)
                         + 0.5 * symmetric_cross_entropy(aug_logits, teacher_logits)).mean()
        loss = self.lambda_ce_trg * self_training + self.lambda_cont * contrastive
        source = None
        if self.lambda_ce_src > 0:
            images, labels = self.next_source_batch()
            source = F.cross_entropy(self.model(images).float(), labels)
            loss = loss + self.lambda_ce_src * source
        self.backward(loss)
        self.step()
        ema_update_(self.teacher.parameters(), self.model.parameters(), self.teacher_momentum)

        record = RMTRecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss.detach(),
                           self_training_loss=self_training.detach(), contrastive_loss=contrastive.detach(),
                           source_loss=None if source is None else source.detach())
        return (logits + teacher_logits).detach(), record
