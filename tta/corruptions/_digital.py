"""Digital corruptions: brightness, contrast, saturate, pixelate, JPEG, elastic."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Context, pil_box_matrix, pixel_grid, round_half_up, symmetric_filter_matrix


def contrast(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Pull every channel towards its own image mean by factor ``c``."""
    means = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - means) * c + means).clamp_(0, 1)


def _value_and_delta(x: Tensor) -> tuple[Tensor, Tensor]:
    v = x.amax(dim=1, keepdim=True)
    return v, v - x.amin(dim=1, keepdim=True)


def brightness(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Add ``c`` to HSV value, keeping hue and saturation.

    With H and S fixed every channel is proportional to V, so the skimage
    rgb2hsv -> hsv2rgb round trip is ``x * V'/V`` (black, V = 0, has S = 0 and
    becomes grey V').
    """
    v, _ = _value_and_delta(x)
    v_new = (v + c).clamp(0, 1)
    ratio = torch.where(v > 0, v_new / v.clamp_min(1e-12), torch.zeros_like(v))
    out = torch.where(v > 0, x * ratio, v_new.expand_as(x))
    return out.clamp_(0, 1)


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
    q = ctx.quantize

    def resample(v: Tensor, n_in: int, n_out: int, dim: int) -> Tensor:
        m = pil_box_matrix(n_in, n_out, False)
        if (np.count_nonzero(m, axis=1) == 1).all():
            idx = torch.as_tensor(m.argmax(axis=1), device=v.device)
            return v.index_select(dim, idx)
        if q:
            member = torch.as_tensor(m > 0, dtype=v.dtype, device=v.device)
            sums = v @ member.T if dim == -1 else member @ v
            count = (m > 0).sum(axis=1)
            kint = np.floor(0.5 + (1.0 / count) * (1 << 22))  # Pillow's 8-bit coefficients
            shape = (-1, 1) if dim == -2 else (1, -1)
            k = torch.as_tensor(kint, dtype=torch.float64, device=v.device).view(shape)
            return torch.floor((sums.double() * k + (1 << 21)) / (1 << 22)).clamp_(0, 255).to(v.dtype)
        mt = torch.as_tensor(m, dtype=v.dtype, device=v.device)
        return v @ mt.T if dim == -1 else mt @ v

    v = x * 255
    if q:
        v = round_half_up(v)
    v = resample(v, w, sw, -1)
    v = resample(v, h, sh, -2)
    v = resample(v, sw, w, -1)
    v = resample(v, sh, h, -2)
    return v / 255


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
    4:2:0 chroma. Colour conversion and resampling are libjpeg's integer maths
    (bit-exact); the DCTs are exact float transforms where libjpeg uses its
    fixed-point ``islow`` ones, so rare coefficients on a rounding boundary differ.

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
    rgb = _ycc_to_rgb(torch.cat((y.to(torch.int32)[:, None, :h, :w], chroma), 1))
    return (rgb.to(x.dtype) / 255)



def elastic_transform(x: Tensor, c: tuple[float, float, float], ctx: Context) -> Tensor:
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
    jitter = ctx.rng.uniform((b, 3, 2), -float(c[2]), float(c[2])).to(torch.float32)
    src = torch.as_tensor(pts1, device=dev)
    dst = (src[None] + jitter.to(dev)).double()  # float32 sums, as the original
    src = src.double()
    # getAffineTransform maps src -> dst; warpAffine samples src at M^-1(dst pixel)
    ones = torch.ones(3, 1, dtype=torch.float64, device=dev)
    a_src = torch.cat((src, ones), 1).expand(b, 3, 3)
    m = torch.linalg.solve(a_src, dst).transpose(1, 2)  # (B, 2, 3)
    lin_inv = torch.linalg.inv(m[:, :, :2])
    shift_inv = -(lin_inv @ m[:, :, 2:])
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=dev), torch.arange(w, dtype=torch.float64, device=dev),
        indexing="ij",
    )
    sx = lin_inv[:, 0, 0, None, None] * gx + lin_inv[:, 0, 1, None, None] * gy + shift_inv[:, 0, 0, None, None]
    sy = lin_inv[:, 1, 0, None, None] * gx + lin_inv[:, 1, 1, None, None] * gy + shift_inv[:, 1, 0, None, None]
    # OpenCV quantises source positions to 1/32 pixel (INTER_BITS = 5)
    sx = torch.round(sx * 32) / 32
    sy = torch.round(sy * 32) / 32
    # reflection about the outer pixel centres (align_corners=True) is OpenCV's
    # BORDER_REFLECT_101
    grid = pixel_grid(sy, sx, h, w, align_corners=True).to(x.dtype)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

    def field() -> Tensor:
        noise = ctx.rng.uniform((b, h, w), -1.0, 1.0)
        sigma = float(c[1])
        if sigma > 0:
            ah = torch.as_tensor(symmetric_filter_matrix(h, sigma, 3.0), dtype=noise.dtype, device=dev)
            aw = torch.as_tensor(symmetric_filter_matrix(w, sigma, 3.0), dtype=noise.dtype, device=dev)
            noise = ah @ noise @ aw.T
        return (noise * float(c[0])).to(torch.float32).to(torch.float64)

    dx = field()
    dy = field()
    # reflection about the outer pixel edges (align_corners=False) is scipy's
    # mode="reflect" (half-sample symmetric) used by map_coordinates
    grid = pixel_grid(gy + dy, gx + dx, h, w, align_corners=False).to(x.dtype)
    out = F.grid_sample(warped, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp_(0, 1)
