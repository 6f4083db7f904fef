"""Digital corruptions: brightness, contrast, saturate, pixelate, JPEG, elastic."""

from __future__ import annotations

import io
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Context, gaussian_reflect, pil_box_matrix, round_half_up, scaled_half_up, to_uint8


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
    sh, sw = int(h * c), int(w * c)
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


# ------------------------------------------------------------------------------- JPEG
# libjpeg's baseline tables (ITU T.81 Annex K) and its fixed-point colour maths, as
# Pillow's libjpeg-turbo uses them: Y'CbCr in 16-bit fixed point, 4:2:0 chroma by
# 2x2 averaging with alternating rounding bias, "fancy" triangular upsampling.

_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.int64,
).reshape(8, 8)  # fmt: skip
_STD_CHROMA = np.array(
    [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
     47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32,
    dtype=np.int64,
).reshape(8, 8)  # fmt: skip


@lru_cache(maxsize=None)
def jpeg_quant_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """libjpeg ``jpeg_set_quality(quality, force_baseline=TRUE)`` tables."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - quality * 2
    tables = []
    for base in (_STD_LUMA, _STD_CHROMA):
        t = (base * scale + 50) // 100
        tables.append(np.clip(t, 1, 255))
    return tables[0], tables[1]


@lru_cache(maxsize=None)
def _dct_matrix() -> np.ndarray:
    u = np.arange(8)[:, None]
    k = np.arange(8)[None, :]
    a = np.cos((2 * k + 1) * u * np.pi / 16) / 2
    a[0] /= np.sqrt(2)
    return a


def _fix(v: float) -> int:
    return int(v * 65536 + 0.5)


def _rgb_to_ycc(rgb: Tensor) -> Tensor:
    """libjpeg ``rgb_ycc_convert``, bit-exact: int32 maths, arithmetic shifts."""
    r, g, b = rgb.unbind(1)
    half, off = 1 << 15, 128 << 16
    y = (_fix(0.299) * r + _fix(0.587) * g + _fix(0.114) * b + half) >> 16
    cb = (-_fix(0.16874) * r - _fix(0.33126) * g + _fix(0.5) * b + (off + half - 1)) >> 16
    cr = (_fix(0.5) * r - _fix(0.41869) * g - _fix(0.08131) * b + (off + half - 1)) >> 16
    return torch.stack((y, cb, cr), 1)


def _ycc_to_rgb(ycc: Tensor) -> Tensor:
    """libjpeg ``ycc_rgb_convert`` with its lookup-table rounding (int32 maths)."""
    y, cb, cr = ycc.unbind(1)
    cb = cb - 128
    cr = cr - 128
    half = 1 << 15
    r = y + ((_fix(1.402) * cr + half) >> 16)
    g = y + ((-_fix(0.34414) * cb + half - _fix(0.71414) * cr) >> 16)
    b = y + ((_fix(1.772) * cb + half) >> 16)
    return torch.stack((r, g, b), 1).clamp_(0, 255)


def _blocks(plane: Tensor) -> Tensor:
    n, h, w = plane.shape
    return plane.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)


def _unblocks(blocks: Tensor) -> Tensor:
    n, bh, bw = blocks.shape[:3]
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, bh * 8, bw * 8)


def _code_plane(plane: Tensor, qtable: np.ndarray) -> Tensor:
    """Level shift, 8x8 DCT, libjpeg quantisation (round half away from zero of the
    8x-scaled coefficient over 8q, as ``quantize`` does), dequantise, IDCT, round."""
    n, h, w = plane.shape
    # the 2-D DCT of a flattened block is one 64x64 matrix: a single large matmul
    # instead of millions of 8x8 ones
    k = torch.as_tensor(np.kron(_dct_matrix(), _dct_matrix()), dtype=plane.dtype, device=plane.device)
    q = torch.as_tensor(qtable.reshape(-1), dtype=plane.dtype, device=plane.device)
    blk = _blocks(plane - 128).reshape(n, h // 8, w // 8, 64)
    scaled = torch.round((blk @ k.T) * 8)  # libjpeg's integer DCT keeps 8x-scaled integers
    level = torch.sign(scaled) * torch.floor((scaled.abs() + 4 * q) / (8 * q))
    rec = ((level * q) @ k).reshape(n, h // 8, w // 8, 8, 8)
    return _unblocks(round_half_up(rec) + 128).clamp_(0, 255)


def _downsample_h2v2(c: Tensor) -> Tensor:
    """libjpeg ``h2v2_downsample``: 2x2 sums with a rounding bias of 1, 2, 1, 2, ..."""
    n, h, w = c.shape
    s = c.reshape(n, h // 2, 2, w // 2, 2).sum(dim=(2, 4))
    bias = torch.tensor([1, 2], dtype=c.dtype, device=c.device).repeat(w // 4 + 1)[: w // 2]
    return (s + bias) >> 2


def _upsample_h2v2_fancy(c: Tensor, h: int, w: int) -> Tensor:
    """libjpeg ``h2v2_fancy_upsample``: 3/4-1/4 triangle filter both ways, integer
    rounding biases 8 and 7 alternating, edges replicated."""
    up = torch.cat((c[:, :1], c[:, :-1]), 1)
    down = torch.cat((c[:, 1:], c[:, -1:]), 1)
    rows = torch.stack((3 * c + up, 3 * c + down), 2).flatten(1, 2)  # colsums, 2x rows
    left = torch.cat((rows[:, :, :1], rows[:, :, :-1]), 2)
    right = torch.cat((rows[:, :, 1:], rows[:, :, -1:]), 2)
    even = (3 * rows + left + 8) >> 4
    odd = (3 * rows + right + 7) >> 4
    return torch.stack((even, odd), 3).flatten(2, 3)[:, :h, :w]


def jpeg_compression(x: Tensor, c: int, ctx: Context) -> Tensor:
    """Pillow ``save(format='JPEG', quality=c)`` and decode: baseline libjpeg with
    4:2:0 chroma.

    On the CPU through libjpeg(-turbo) itself, the codec Pillow calls, with the
    same settings: bit-identical to the original. torchvision's binding is 1.8x
    faster than Pillow's (no image objects, no file buffers) and 15x faster than
    the codec in tensor maths below, which serves accelerators (no round trip
    through the host).
    """
    if x.device.type != "cpu":
        return _jpeg_tensors(x.contiguous(), int(c))
    # the codec reads and writes interleaved pixels: channels-last images are
    # encoded from their own memory (2.5x faster than an NCHW tensor, which the
    # encoder first transposes) and decoded images come back that way
    pixels = to_uint8(x, torch.channels_last)
    codec = _libjpeg_torchvision if _torchvision_jpeg_works() else _libjpeg_pillow
    return codec(pixels, int(c))


def _libjpeg_torchvision(v: Tensor, quality: int) -> Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    with warnings.catch_warnings():
        # deprecated in torchvision 0.29 for torchcodec; Pillow takes over when gone
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg(encode_jpeg(list(v), quality=quality))
    return _stack_channels_last(decoded)


def _libjpeg_pillow(v: Tensor, quality: int) -> Tensor:
    from PIL import Image

    decoded = []
    for img in v.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        decoded.append(torch.from_numpy(np.asarray(Image.open(buf)).copy()).permute(2, 0, 1))
    return _stack_channels_last(decoded)


def _stack_channels_last(images: list[Tensor]) -> Tensor:
    """(B, 3, H, W) from CHW views of HWC memory, without transposing them."""
    if len(images) == 1:
        return images[0][None]
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, memory_format=torch.channels_last)
    for dst, img in zip(out, images):
        dst.copy_(img)
    return out


@lru_cache(maxsize=None)
def _torchvision_jpeg_works() -> bool:
    try:
        _libjpeg_torchvision(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 50)
    except (ImportError, AttributeError, RuntimeError):  # no torchvision, no libjpeg, API gone
        return False
    return True


def _jpeg_tensors(x: Tensor, c: int) -> Tensor:
    """The codec in tensor maths. Colour conversion and resampling are libjpeg's
    integer maths (bit-exact); the DCTs are exact float transforms where libjpeg
    uses its fixed-point ``islow`` ones, so rare coefficients on a rounding
    boundary differ.

    Not ``kornia.enhance.jpeg_codec_differentiable``: its polynomial (soft)
    rounding, antialiased chroma subsampling and float colour maths land up to
    1.9/255 mean absolute error from Pillow at the ImageNet-C qualities, against
    < 0.05/255 here.
    """
    b, _, h, w = x.shape
    v = torch.floor(x * 255 + 0.5).clamp_(0, 255).to(torch.int32)
    # libjpeg pads each component to whole MCUs (16x16 for 4:2:0) by edge replication
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        v = torch.nn.functional.pad(v.float(), (0, pw, 0, ph), mode="replicate").to(torch.int32)
    ycc = _rgb_to_ycc(v)
    qy, qc = jpeg_quant_tables(c)
    fdtype = torch.float32
    y = _code_plane(ycc[:, 0].to(fdtype), qy)
    chroma = _downsample_h2v2(ycc[:, 1:].reshape(b * 2, h + ph, w + pw))
    chroma = _code_plane(chroma.to(fdtype), qc).to(torch.int32)
    # upsampling sees the chroma actually covering the image (ceil(size / 2)), with
    # the MCU padding discarded, as libjpeg's ``downsampled_width`` does
    ch, cw = (h + 1) // 2, (w + 1) // 2
    chroma = _upsample_h2v2_fancy(chroma[:, :ch, :cw], h, w).reshape(b, 2, h, w)
    return _ycc_to_rgb(torch.cat((y.to(torch.int32)[:, None, :h, :w], chroma), 1)).to(torch.uint8)


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
    # getAffineTransform maps src -> dst; warpAffine samples src at M^-1(dst pixel)
    ones = torch.ones(3, 1, dtype=torch.float64, device=dev)
    a_src = torch.cat((src, ones), 1).expand(b, 3, 3)
    m = torch.linalg.solve(a_src, dst).transpose(1, 2)  # (B, 2, 3)
    lin_inv = torch.linalg.inv(m[:, :, :2])
    shift_inv = -(lin_inv @ m[:, :, 2:])
    ys = torch.arange(h, dtype=torch.float64, device=dev)[:, None]
    xs = torch.arange(w, dtype=torch.float64, device=dev)
    grid = torch.empty((b, h, w, 2), dtype=x.dtype, device=dev)
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
