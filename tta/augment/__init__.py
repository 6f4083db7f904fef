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

__all__ = [
    "DESTROY_TRANSFORMS",
    "Occlude",
    "PatchShuffle",
    "PixelPermute",
    "make_destroy_transform",
    "occlude",
    "patch_shuffle",
    "pixel_permute",
]
