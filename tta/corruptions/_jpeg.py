"""JPEG compression as the original's Pillow round trip: libjpeg itself on the CPU, the
codec in tensor maths on accelerators."""

from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ._common import Context, round_half_up, to_uint8

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
    pixels = _interleaved(x) if x.dtype == torch.uint8 else to_uint8(x, torch.channels_last)
    codec = _libjpeg_torchvision if _torchvision_jpeg_works() else _libjpeg_pillow
    return codec(pixels, int(c))


def _interleaved(v: Tensor) -> Tensor:
    """uint8 images (B, 3, H, W) on the CPU as channels-last pixels: themselves when
    they are, else interleaved by NumPy's strided copy (224 px, one thread: 63 us an
    image against 419 for ``permute().contiguous()``, which the encoder would do
    itself, and 112 for stacked planes)."""
    if v.is_contiguous(memory_format=torch.channels_last):
        return v
    out = np.empty((v.shape[0], v.shape[2], v.shape[3], 3), dtype=np.uint8)
    planes = v.numpy()
    for c in range(3):
        out[..., c] = planes[:, c]
    return torch.from_numpy(out).permute(0, 3, 1, 2)


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
    uses its fixed-point ``islow`` ones, so coefficients on a rounding boundary
    differ. Mean absolute error against Pillow: 0.006-0.05 levels on smooth images
    (CIFAR-10 upsampled to 64 px), 0.04-0.19 on photographs (the ImageNet-C frost
    photographs cropped to 224 px, qualities 20-80; worst at 80, whose small
    quantisation steps meet the DCTs' difference most often: 10% of values differ
    there, single pixels by up to 14 levels).

    Not ``kornia.enhance.jpeg_codec_differentiable``: its polynomial (soft)
    rounding, antialiased chroma subsampling and float colour maths land up to
    1.9/255 mean absolute error from Pillow at the ImageNet-C qualities.
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
