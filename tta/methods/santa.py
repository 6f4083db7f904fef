"""``santa``: source anchoring network and target alignment for continual test-time
adaptation (Chakrabarty et al., TMLR 2023).

The norm layers' affine parameters adapt. A frozen copy of the source model, which
normalises with the test batch's statistics (the anchor), keeps the student's
predictions on the test batch and on an augmented copy near its own; a contrastive
loss pulls the features of both toward the nearest class prototype of the source
data. Source images are used once, for the prototypes.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn

from ..augment.kornia_views import check_transform, cotta_augmentation
from .base import TTAMethod
from .entropy import cross_entropy_to
from .features import features_and_logits
from .prototypes import attach_prototypes, check_prototype_options, prototype_contrastive_loss
from .records import SANTARecord, StepRecord
from .registry import register_method
from .teacher import frozen_copy


@register_method("santa")
class SANTA(TTAMethod):
    """SANTA. Defaults are the official code's CIFAR-10-C setting
    (mariodoebler/test-time-adaptation, conf.py and cfgs/cifar10_c/santa.yaml: Adam,
    lr 1e-3, both loss weights 1, prototypes of up to 100,000 source images,
    projector width 128, temperature 0.1).

    Args:
        source_loader: the labelled source images, an iterable of (images in [0, 1]
            on the model's device, labels) batches; tta-bench passes
            :class:`~tta.bench.source_data.SourceBatches` of ``data.source_root``.
            Required: the class prototypes are computed from it when wrapping.
        lambda_ce_trg: weight of the anchoring loss: ``-1/2 sum p log a - 1/2 sum q
            log a`` with ``p``, ``q`` the student's probabilities on the batch and its
            augmented copy and ``a`` the anchor's (half the paper's eq. 2, as the
            official code).
        lambda_cont: weight of the contrastive loss toward the source prototypes.
        num_prototype_images: source images the class prototypes average (whole
            batches until more than this many; the default covers all of CIFAR-10).
        projection_dim: width of the projector the contrastive loss compares in.
        temperature: the temperature of the contrastive loss (SupCon's tau).
        transform: the view augmentation, a module on (B, 3, H, W) batches in [0, 1]
            (default: :func:`~tta.augment.kornia_views.cotta_augmentation`).

    Presets: ``"cifar10"`` is these defaults (batch 200); ``"imagenet"`` the
    ImageNet-C setting (cfgs/imagenet_c/santa.yaml): SGD (momentum 0.9, Nesterov)
    lr 0.01, batch 64.
    """

    record_type = SANTARecord
    presets = {"cifar10": {}, "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True}}

    def __init__(
        self,
        model: nn.Module,
        *,
        source_loader: Iterable | None = None,
        lambda_ce_trg: float = 1.0,
        lambda_cont: float = 1.0,
        num_prototype_images: int = 100000,
        projection_dim: int = 128,
        temperature: float = 0.1,
        transform: nn.Module | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        check_prototype_options(model, "santa", source_loader, "for its class prototypes",
                                loss_weights=(lambda_ce_trg, lambda_cont), num_prototype_images=num_prototype_images,
                                projection_dim=projection_dim, temperature=temperature)
        check_transform(transform)
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.lambda_ce_trg, self.lambda_cont, self.temperature = lambda_ce_trg, lambda_cont, temperature
        self.transform = transform if transform is not None else cotta_augmentation()
        # The source weights on test-batch statistics, never updated.
        self.anchor = frozen_copy(self.model)
        attach_prototypes(self, source_loader, num_prototype_images, projection_dim)
        self.snapshot()

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        features, logits = features_and_logits(self.model, x)
        aug_features, aug_logits = features_and_logits(self.model, self.transform(x))
        # The anchor's weights take no gradient and x none either, so no graph is
        # built; grad mode stays on for the fused BatchNorm kernel.
        anchor_logits = self.anchor(x).detach()

        contrastive = prototype_contrastive_loss(self.projector, self.prototypes, features, aug_features,
                                                 self.temperature)
        # The student's probabilities weigh the anchor's log-probabilities: the
        # gradient flows through the student's side only.
        anchoring = (0.5 * cross_entropy_to(anchor_logits, logits)
                     + 0.5 * cross_entropy_to(anchor_logits, aug_logits)).mean()
        loss = self.lambda_ce_trg * anchoring + self.lambda_cont * contrastive
        self.backward(loss)
        self.step()

        record = SANTARecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss.detach(),
                             anchor_loss=anchoring.detach(), contrastive_loss=contrastive.detach())
        return logits.detach(), record
