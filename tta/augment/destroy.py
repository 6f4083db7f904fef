"""Object-destroying transforms of DeYO (Lee et al., ICLR 2024).

Each keeps an image's low-level statistics (its patches, its pixel values) but breaks
the spatial arrangement that makes up object shape. A prediction that survives the
transform rests on shape-free cues; DeYO's PLPD measures how much it drops.
All three work on (B, C, H, W) tensors of any float dtype on any device, and draw an
independent permutation per image.

Why not Kornia's: ``kornia.augmentation.RandomJigsaw`` is the same patch shuffle
but slower at DeYO's ImageNet size (64 x 3 x 224 x 224, 4 x 4 grid, 1 CPU thread:
214 ms against 113 ms here; at 32 px 6.3 ms against 8.4 ms), and cannot take a
grid that does not divide the image, which DeYO resizes for; ``RandomErasing``
draws a random box and fills a constant, where DeYO's occlusion is a fixed square
filled with each image's own mean. DeYO takes any module of one's own as
``destroy=`` (a Kornia pipeline included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int

__all__ = [
    "patch_shuffle",
    "pixel_permute",
    "occlude",
    "PatchShuffle",
    "PixelPermute",
    "Occlude",
    "DESTROY_TRANSFORMS",
    "make_destroy_transform",
]


def _check(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")


def _random_permutations(batch: int, n: int, device, generator: torch.Generator | None) -> Tensor:
    # argsort of uniform noise: one independent permutation per row, no Python loop.
    noise = torch.rand(batch, n, device=device if generator is None else generator.device, generator=generator)
    return noise.argsort(dim=1).to(device)


def patch_shuffle(x: Tensor, patch_len: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Cut each image into a ``patch_len`` x ``patch_len`` grid and permute the
    patches, independently per image. Sizes not divisible by ``patch_len`` are
    resized down to the multiple below and back, as DeYO does."""
    _check(x)
    check_positive_int(patch_len, "patch_len")
    b, c, h, w = x.shape
    if patch_len > min(h, w):
        raise ValueError(f"patch_len {patch_len} is larger than the image ({h}x{w})")
    # The official code's grid: ``(side // patch_len) * patch_len`` (rounded down).
    hh, ww = (h // patch_len) * patch_len, (w // patch_len) * patch_len
    y = x if (hh, ww) == (h, w) else F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    ph, pw = hh // patch_len, ww // patch_len
    n = patch_len * patch_len
    patches = y.reshape(b, c, patch_len, ph, patch_len, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, ph, pw)
    perm = _random_permutations(b, n, x.device, generator)
    patches = patches.gather(1, perm.view(b, n, 1, 1, 1).expand_as(patches))
    y = patches.reshape(b, patch_len, patch_len, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)
    if (hh, ww) != (h, w):
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    return y


def pixel_permute(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Permute all pixel positions of each image (channels move together),
    independently per image: the image's colour histogram survives, nothing else."""
    _check(x)
    b, c, h, w = x.shape
    perm = _random_permutations(b, h * w, x.device, generator)
    flat = x.reshape(b, c, h * w)
    return flat.gather(2, perm.unsqueeze(1).expand_as(flat)).reshape(b, c, h, w)


def occlude(
    x: Tensor, size: float | int = 0.5, top: int | None = None, left: int | None = None
) -> Tensor:
    """Fill a square with each image's own per-channel mean.

    ``size`` is the side in pixels (int) or as a fraction of the shorter side
    (float); ``top``/``left`` place it, centred by default (DeYO's 112-pixel square
    at (56, 56) on 224-pixel images is ``size=0.5``)."""
    _check(x)
    _, _, h, w = x.shape
    side = int(round(size * min(h, w))) if isinstance(size, float) else int(size)
    if not 0 < side <= min(h, w):
        raise ValueError(f"occlusion size {size!r} does not fit a {h}x{w} image")
    top = (h - side) // 2 if top is None else top
    left = (w - side) // 2 if left is None else left
    if not (0 <= top <= h - side and 0 <= left <= w - side):
        raise ValueError(f"occlusion at ({top}, {left}) of side {side} leaves the {h}x{w} image")
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool, device=x.device)
    mask[..., top : top + side, left : left + side] = True
    return torch.where(mask, x.mean(dim=(2, 3), keepdim=True), x)


class PatchShuffle(nn.Module):
    """Module form of :func:`patch_shuffle`."""

    def __init__(self, patch_len: int = 4) -> None:
        super().__init__()
        self.patch_len = patch_len

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return patch_shuffle(x, self.patch_len, generator)

    def extra_repr(self) -> str:
        return f"patch_len={self.patch_len}"


class PixelPermute(nn.Module):
    """Module form of :func:`pixel_permute`."""

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return pixel_permute(x, generator)


class Occlude(nn.Module):
    """Module form of :func:`occlude`."""

    def __init__(self, size: float | int = 0.5, top: int | None = None, left: int | None = None) -> None:
        super().__init__()
        self.size, self.top, self.left = size, top, left

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return occlude(x, self.size, self.top, self.left)

    def extra_repr(self) -> str:
        return f"size={self.size}, top={self.top}, left={self.left}"


DESTROY_TRANSFORMS = {"patch": PatchShuffle, "pixel": PixelPermute, "occ": Occlude}


def make_destroy_transform(
    aug_type: str, patch_len: int = 4, occlusion_size: float | int = 0.5,
    occlusion_top: int | None = None, occlusion_left: int | None = None,
) -> nn.Module:
    """DeYO's ``aug_type`` option: ``"patch"``, ``"pixel"`` or ``"occ"``."""
    if aug_type == "patch":
        return PatchShuffle(patch_len)
    if aug_type == "pixel":
        return PixelPermute()
    if aug_type == "occ":
        return Occlude(occlusion_size, occlusion_top, occlusion_left)
    raise ValueError(f"aug_type must be one of {sorted(DESTROY_TRANSFORMS)}, got {aug_type!r}")
