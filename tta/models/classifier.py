"""Classifiers in pixel space: normalisation lives inside the model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for float RGB ``x`` in [0, 1].

    Keeping normalisation inside the model lets augmentations and corruptions work
    on plain pixels. ``num_classes`` and ``input_size`` describe what it expects.
    The backbone follows timm's interface (``forward_features``, ``forward_head``,
    ``get_classifier``), which :meth:`forward_features` and :meth:`get_classifier`
    expose in pixel space.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.normalize(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled features the classifier reads (timm's ``pre_logits``), (B, D):
        ``get_classifier()(forward_features(x))`` is ``forward(x)``. Methods that
        learn on features (RMT, SANTA, AdaContrast) use this split."""
        return self.backbone.forward_head(self.backbone.forward_features(self.normalize(x)), pre_logits=True)

    def get_classifier(self) -> nn.Module:
        """The last layer, features to logits."""
        return self.backbone.get_classifier()
