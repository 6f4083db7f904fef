"""Batched augmentations as Kornia-style ``nn.Module``s (any device, no per-image loops)."""

from .destroy import (
    DESTROY_TRANSFORMS,
    Occlude,
    PatchShuffle,
    PixelPermute,
    make_destroy_transform,
    occlude,
    patch_shuffle,
    pixel_permute,
)
from .views import (
    Views,
    augmix,
    gather_views,
    make_views,
    random_resized_crops,
)

__all__ = [
    "DESTROY_TRANSFORMS",
    "Occlude",
    "PatchShuffle",
    "PixelPermute",
    "make_destroy_transform",
    "occlude",
    "patch_shuffle",
    "pixel_permute",
    "Views",
    "augmix",
    "gather_views",
    "make_views",
    "random_resized_crops",
]
