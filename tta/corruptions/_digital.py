"""Digital corruptions: brightness, contrast, saturate, pixelate, elastic (JPEG is in
``_jpeg``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Context, scaled_half_up
from ._filters import gaussian_reflect
from ._resample import pil_box_matrix


def contrast(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Pull every channel towards its own image mean by factor ``c``."""
    means = x.mean(dim=(-2, -1), keepdim=True)
    return (x - means).mul_(c).add_(means)


def _value_and_delta(x: Tensor) -> tuple[Tensor, Tensor]:
    v = x.amax(dim=1, keepdim=True)
    return v, v - x.amin(dim=1, keepdim=True)


def brightness(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Add ``c`` to HSV value, keeping hue and saturation.

    With H and S fixed every channel is proportional to V, so the skimage
    rgb2hsv -> hsv2rgb round trip is ``x * V'/V`` (black, V = 0, has S = 0 and
    becomes grey V').
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp_(0, 1)
    # black (v = 0, so x = 0) gets v_new through the second term; elsewhere that
    # term is + 0 (float arithmetic instead of torch.where, 20x slower on the CPU)
    black = 1 - torch.sign(v)
    return (x * (v_new / v.clamp_min(1e-12))).add_(black * v_new)


def saturate(x: Tensor, c: tuple[float, float], ctx: Context) -> Tensor:
    """Set HSV saturation to ``clip(S * c[0] + c[1])``, keeping hue and value.

    Each channel is ``V * (1 - S * w)`` with a hue weight ``w = (V - x) / (V - min)``;
    greys have hue 0 in skimage (red), so ``w = (0, 1, 1)`` -- a positive shift
    tints them red exactly like the original.
    """
    v, delta = _value_and_delta(x)
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * c[0] + c[1]).clamp(0, 1)
    grey_w = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    w = torch.where(delta > 0, (v - x) / delta.clamp_min(1e-12), grey_w)
    return (v * (1 - s_new * w)).clamp_(0, 1)


def pixelate(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Pillow BOX downscale to ``int(size * c)`` and BOX upscale back.

    Pillow resizes 8-bit images in two passes (horizontal, then vertical), each
    rounded to 8 bits with 22-bit fixed-point weights; with ``quantize`` this is
    reproduced exactly: box sums of integer levels (exact in float32), then
    Pillow's fixed-point division and rounding (ties included) in float64 on the
    small downscaled tensor. The upscale copies one source pixel per output pixel.
    """
    h, w = x.shape[-2:]
    # at least 1 px (the original's Pillow refuses an empty image)
    sh, sw = max(1, int(h * c)), max(1, int(w * c))
    # round half up, as Pillow gets the original's uint8 image
    v = scaled_half_up(x).floor_() if ctx.quantize else x * 255
    v = _box_resize(v, sw, -1, ctx.quantize)
    v = _box_resize(v, sh, -2, ctx.quantize)
    if ctx.quantize:  # 8-bit levels: upscale bytes, 4x less to copy
        v = v.to(torch.int32).to(torch.uint8)
    v = _box_resize(v, w, -1, ctx.quantize)
    v = _box_resize(v, h, -2, ctx.quantize)
    return v if ctx.quantize else v.div_(255)


def _box_resize(v: Tensor, n_out: int, dim: int, fixed_point: bool) -> Tensor:
    """Pillow's BOX resize of ``v`` along ``dim`` (-1 or -2) to ``n_out`` samples."""
    kind, arg, coefficients = _box_plan(v.shape[dim], n_out, fixed_point)
    if kind == "repeat":  # an integral upscale: 6x faster than index_select on rows
        return v.repeat_interleave(arg, dim)
    if kind == "index":  # every output copies one input
        return v.index_select(dim, torch.as_tensor(arg, device=v.device))
    if kind == "matrix":
        mt = torch.as_tensor(arg, dtype=v.dtype, device=v.device)
        return v @ mt.T if dim == -1 else mt @ v
    if kind == "member":
        member = torch.as_tensor(arg, dtype=v.dtype, device=v.device)
        sums = v @ member.T if dim == -1 else member @ v
    else:
        # boxes of f consecutive pixels: f strided slices added, 4x faster than the
        # matmul with the membership matrix on the last dimension (224 -> 56 px)
        f = arg
        part = [v.narrow(dim, t, v.shape[dim] - f + 1)[_every(f, dim)] for t in range(f)]
        sums = part[0] + part[1]
        for p in part[2:]:
            sums += p
        if f & (f - 1) == 0:
            # the coefficient is 2^22 / f exactly: Pillow's fixed point rounds
            # s / f half up, which float32 does exactly for power-of-two f
            return sums.mul_(1.0 / f).add_(0.5).floor_()
    shape = (-1, 1) if dim == -2 else (1, -1)
    k = torch.as_tensor(coefficients, dtype=torch.float64, device=v.device).view(shape)
    return sums.double().mul_(k).add_(1 << 21).div_(1 << 22).floor_().clamp_(0, 255).to(v.dtype)


@lru_cache(maxsize=64)
def _box_plan(n_in: int, n_out: int, fixed_point: bool) -> tuple[str, Any, np.ndarray | None]:
    """How :func:`_box_resize` does one size change (decided once: the checks on
    the resampling matrix cost as much as a resize of a small image)."""
    m = pil_box_matrix(n_in, n_out, False)
    member = m > 0
    if (member.sum(axis=1) == 1).all():
        return ("repeat", n_out // n_in, None) if n_out % n_in == 0 else ("index", m.argmax(axis=1), None)
    if not fixed_point:
        return "matrix", m, None
    kint = np.floor(0.5 + (1.0 / member.sum(axis=1)) * (1 << 22))  # Pillow's 8-bit coefficients
    return ("strided", n_in // n_out, kint) if n_in % n_out == 0 else ("member", member, kint)


def _every(f: int, dim: int) -> tuple[slice, ...]:
    """Index taking every ``f``-th entry along ``dim`` (-1 or -2)."""
    return (..., slice(None, None, f)) if dim == -1 else (..., slice(None, None, f), slice(None))


def elastic_transform_draws(x: Tensor, c: tuple[float, float, float], ctx: Context) -> tuple[Tensor, ...]:
    """The affine jitter of the three control points, then the raw x and y
    displacement noise, U(-1, 1) per pixel (the original's order)."""
    b, _, h, w = x.shape
    jitter = ctx.rng.uniform((b, 3, 2), -float(c[2]), float(c[2]))
    return jitter, ctx.rng.uniform((b, h, w), -1.0, 1.0), ctx.rng.uniform((b, h, w), -1.0, 1.0)


def elastic_transform(
    x: Tensor, c: tuple[float, float, float], ctx: Context, jitter: Tensor, noise_x: Tensor, noise_y: Tensor
) -> Tensor:
    """Random affine warp (``cv2.warpAffine``, reflect-101 border) followed by a
    smooth random displacement field (``map_coordinates``, order 1, scipy
    ``reflect`` border), as in the original (a modification of Simard et al.).

    ``c`` = (displacement scale, displacement smoothing sigma, affine jitter), in
    pixels; the ImageNet rows keep the original's 244-for-224 constants.
    """
    b, _, h, w = x.shape
    dev = x.device
    # the original's control points, as (x, y) for OpenCV, from (H, W)-ordered
    # centre and size values (identical for square images)
    cs = np.float32([h, w]) // 2
    sq = min(h, w) // 3
    pts1 = np.float32([cs + sq, [cs[0] + sq, cs[1] - sq], cs - sq])
    src = torch.as_tensor(pts1, device=dev)
    dst = (src[None] + jitter.to(device=dev, dtype=torch.float32)).double()  # float32 sums, as the original
    src = src.double()
    ys = torch.arange(h, dtype=torch.float64, device=dev)[:, None]
    xs = torch.arange(w, dtype=torch.float64, device=dev)
    grid = torch.empty((b, h, w, 2), dtype=x.dtype, device=dev)
    # Under 3 px the control points coincide and the original's affine is singular
    # (OpenCV then fills the image with one pixel): no affine warp there.
    warped = x
    if sq:
        # getAffineTransform maps src -> dst; warpAffine samples src at M^-1(dst pixel)
        ones = torch.ones(3, 1, dtype=torch.float64, device=dev)
        a_src = torch.cat((src, ones), 1).expand(b, 3, 3)
        m = torch.linalg.solve(a_src, dst).transpose(1, 2)  # (B, 2, 3)
        lin_inv = torch.linalg.inv(m[:, :, :2])
        shift_inv = -(lin_inv @ m[:, :, 2:])
        for i, n in enumerate((w, h)):  # x, then y
            # 32 x the source position (OpenCV quantises it to 1/32 pixel, INTER_BITS =
            # 5); scaling by 32 is exact, so this rounds as (a x + b y + shift) * 32
            a, bb, shift = (32 * v[:, None, None] for v in (lin_inv[:, i, 0], lin_inv[:, i, 1], shift_inv[:, i, 0]))
            pos32 = ((a * xs) + (bb * ys)).add_(shift).round_()
            # reflection about the outer pixel centres (align_corners=True) is OpenCV's
            # BORDER_REFLECT_101
            torch.sub(pos32.mul_(2.0 / (32 * max(n - 1, 1))), 1, out=grid[..., i])
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    # reflection about the outer pixel edges (align_corners=False) is scipy's
    # mode="reflect" (half-sample symmetric) used by map_coordinates
    for i, (noise, n, pos) in enumerate(((noise_x, w, xs), (noise_y, h, ys))):
        shift = noise * float(c[0]) if float(c[1]) <= 0 else gaussian_reflect(noise, float(c[1]), 3.0, float(c[0]))
        torch.mul(shift.to(x.dtype).add_(pos.to(x.dtype)), 2.0 / n, out=grid[..., i]).add_(1.0 / n - 1)
    return F.grid_sample(warped, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
