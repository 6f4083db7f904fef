"""``ttaug``: test-time augmentation, the baseline of MEMO (Zhang et al., NeurIPS
2022) as mariodoebler/test-time-adaptation runs it (``TTAug``); nothing adapts.

Each image is predicted from itself and ``num_views`` AugMix views of it (a random
crop and flip, then AugMix at severity 1): the model's logits are averaged over the
``1 + num_views`` views. BatchNorm layers normalise each image's views with their
own statistics mixed with the source ones (``bn_alpha = 0.1`` of the views').
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..augment.kornia_views import augmix_views_transform, check_transform, check_view_options
from ..augment.views import make_views
from .base import TTAMethod
from .norm_layers import grouped_batch_stats
from .records import StepRecord
from .registry import register_method

__all__ = ["TTAug"]

@register_method("ttaug")
class TTAug(TTAMethod):
    """Test-time augmentation: per image, the mean of the logits over the image and
    ``num_views`` augmented views of it; no parameter or statistic changes.

    BatchNorm statistics: each image's ``1 + num_views`` views go through the model
    together and every BatchNorm layer normalises them with
    ``bn_alpha * (their statistics) + (1 - bn_alpha) * (source statistics)``, per
    image (the port's ``AlphaBatchNorm`` at batch size 1). The views' variance is the
    biased one (the port's is unbiased, a factor ``n / (n - 1)`` with ``n`` the
    views' pixels per channel, >= 33 x 8 x 8 on ResNet-20: the mixed variance differs
    by at most ``bn_alpha / (n - 1)`` < 5e-5 relative).

    Args:
        num_views: augmented views per image (the clean image comes on top).
        crop: the crop before AugMix: ``"pad"`` (CIFAR: random crop with 4-pixel zero
            padding) or ``"resized"`` (ImageNet: random resized crop); see
            :class:`~tta.augment.kornia_views.CropFlip`.
        transform: the view pipeline instead of crop + AugMix, a module on (N, 3, H,
            W) batches in [0, 1] with per-image randomness (e.g. a
            ``kornia.augmentation`` pipeline); the clean image stays view 0.
        images_per_forward: how many images' views go through the model in one
            forward. ``None``: all on a GPU; on the CPU as many as make about 256
            views (7 images of 33 views; a batch past the caches is slower per image).
            A lower cap saves GPU memory at large images.
        bn_alpha: weight of the views' statistics in BatchNorm layers (the port's
            ``BN.ALPHA``).

    Presets: the port has no ttaug.yaml: both take its conf.py defaults (32 views,
    ``BN.ALPHA`` 0.1); ``"imagenet"`` crops as its ImageNet loader does
    (``crop="resized"``). The port's ImageNet clean view is resized to 256 and
    centre-cropped back to 224 (a 1.14x zoom of ImageNet-C's 224 px images); here the
    clean view is the image as given.
    """

    has_optimizer = False
    presets = {"cifar10": {}, "imagenet": {"crop": "resized"}}

    def __init__(
        self,
        model: nn.Module,
        *,
        num_views: int = 32,
        crop: str = "pad",
        transform: nn.Module | None = None,
        images_per_forward: int | None = None,
        bn_alpha: float = 0.1,
        **kwargs,
    ) -> None:
        check_view_options(num_views, crop, images_per_forward)
        check_transform(transform)
        with warnings.catch_warnings():
            # The base class warns that a model without BatchNorm predicts as the
            # source model; TTAug still averages its views there.
            warnings.filterwarnings("ignore", message=".*has no BatchNorm layer")
            super().__init__(model, bn_alpha=bn_alpha, **kwargs)
        self.num_views, self.crop, self.images_per_forward = num_views, crop, images_per_forward
        self.transform = transform if transform is not None else augmix_views_transform(crop)

    def views(self, x: Tensor) -> Tensor:
        """Each image of ``x`` (B, C, H, W) followed by its ``num_views`` augmented
        views: (B * (1 + num_views), C, H, W), the views of an image contiguous."""
        return make_views(x, 1 + self.num_views, transform=self.transform).flatten(0, 1)

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        views = 1 + self.num_views
        per_forward = self.images_per_forward or (
            x.shape[0] if x.device.type != "cpu" else max(1, 256 // views))
        logits = []
        for chunk in x.split(per_forward):
            # One group of statistics per image: its views alone, as a forward per image.
            with grouped_batch_stats(self.model, groups=chunk.shape[0]):
                out = self.model(self.views(chunk))
            logits.append(out.float().view(chunk.shape[0], views, -1).mean(dim=1))
        return torch.cat(logits), StepRecord(num_samples=x.shape[0], num_selected=0)
