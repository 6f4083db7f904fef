"""Resampling as the original does it: scipy's corner-aligned zoom (``clipped_zoom``),
ImageMagick's motion blur and Pillow's box filter."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=64)
def pil_box_matrix(in_size: int, out_size: int, fixed_point: bool) -> np.ndarray:
    """Pillow's BOX resampling along one axis, as an ``out x in`` matrix.

    Follows Pillow's ``precompute_coeffs``: pixel centres inside the (possibly
    fractional) box get equal weight, and for 8-bit images weights are rounded to
    22-bit fixed point, which decides how exact ties round.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        pos = (np.arange(xmin, xmax) - center + 0.5) / filterscale
        w = ((pos > -0.5) & (pos <= 0.5)).astype(np.float64)
        if w.sum() > 0:
            w /= w.sum()
        if fixed_point:
            w = np.floor(0.5 + w * (1 << 22)) / (1 << 22)
        mat[xx, xmin:xmax] = w
    return mat


def scipy_zoom_coords(size: int, zoom: float) -> tuple[np.ndarray, int]:
    """Source coordinates of ``clipped_zoom``: crop the central ``ceil(size/zoom)``
    pixels, ``scipy.ndimage.zoom(order=1)`` them (corner-aligned linear
    interpolation to ``round(crop * zoom)`` samples) and trim back to ``size``."""
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - size) // 2
    j = np.arange(trim, trim + size, dtype=np.float64)
    coords = top + j * ((crop - 1) / (out - 1) if out > 1 else 0.0)
    return coords, crop


@lru_cache(maxsize=256)
def _zoom_taps(size: int, zoom: float, device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Linear interpolation at :func:`scipy_zoom_coords`: the two source indices
    of every output sample and the second one's weight (as a column)."""
    coords, _ = scipy_zoom_coords(size, zoom)
    i0 = np.floor(coords)
    frac = coords - i0
    i0 = i0.astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return as_t(i0, torch.int64), as_t(i1, torch.int64), as_t(frac[:, None], dtype)


class ClippedZooms:
    """The original ``clipped_zoom`` of images ``x`` (NCHW), by any factor: linear
    zoom about the centre, corner-aligned like ``scipy.ndimage.zoom(order=1)``.

    Separable, and along rows only: interpolate the columns as rows of the
    transposed images, transpose back, interpolate the rows. Gathering whole rows
    is 5-10x faster on the CPU than gathering single values across them
    (``index_select`` on the last dimension, or the 4-tap ``grid_sample`` this
    replaces, 2x slower for zoom blur). The transposed images and the scratch
    tensors are made once for all the zooms of the same images (zoom blur takes
    11; fresh tensors each time: 1.1-1.3x slower). A zoom is valid until the next.
    """

    def __init__(self, x: Tensor):
        self.x = x
        self.xt = x.transpose(-1, -2).contiguous()
        self.cols = [torch.empty_like(self.xt) for _ in range(2)]
        self.rows = [torch.empty_like(x) for _ in range(3)]

    def __call__(self, zoom: float) -> Tensor:
        h, w = self.x.shape[-2:]
        dev, dtype = str(self.x.device), self.x.dtype
        cols = self._lerp_rows(self.xt, _zoom_taps(w, float(zoom), dev, dtype), self.cols)
        self.rows[2].copy_(cols.transpose(-1, -2))
        return self._lerp_rows(self.rows[2], _zoom_taps(h, float(zoom), dev, dtype), self.rows)

    @staticmethod
    def _lerp_rows(v: Tensor, taps: tuple[Tensor, Tensor, Tensor], out: list[Tensor]) -> Tensor:
        i0, i1, frac = taps
        a = torch.index_select(v, -2, i0, out=out[0])
        return a.lerp_(torch.index_select(v, -2, i1, out=out[1]), frac)


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """The original ``clipped_zoom`` of ``x`` (see :class:`ClippedZooms`)."""
    return ClippedZooms(x)(zoom)


def imagemagick_motion_offsets(radius: float, sigma: float, angle_deg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Taps of ImageMagick's ``MotionBlurImage``: a one-sided Gaussian of width
    ``2*ceil(radius)+1`` laid along ``angle`` with integer (rounded-up) offsets.

    Returns ``(weights (K,), dx (B, K), dy (B, K))``; the weights on the CPU (they
    do not depend on the angles), so that the accelerator path reads them without a
    host-device sync per tap.
    """
    width = int(2 * math.ceil(radius) + 1) if radius > 1e-12 else 3
    sig = sigma if abs(sigma) > 1e-12 else 1e-12
    taps = torch.arange(width, dtype=torch.float64)
    k = torch.exp(-(taps * taps) / (2 * sig * sig))
    k = k / k.sum()
    i = taps.to(angle_deg.device)
    theta = torch.deg2rad(angle_deg.to(torch.float64))[:, None]
    # ImageMagick scales the direction by the kernel width and divides by the hypot
    # again; the ratio is cos/sin up to rounding, which ceil(.. - 0.5) absorbs.
    px = width * torch.sin(theta)
    py = width * torch.cos(theta)
    norm = torch.hypot(px, py)
    dx = torch.ceil(i[None] * py / norm - 0.5).long()
    dy = torch.ceil(i[None] * px / norm - 0.5).long()
    return k, dx, dy


def motion_blur_im(x: Tensor, radius: float, sigma: float, angle_deg: Tensor) -> Tensor:
    """ImageMagick ``-motion-blur radius x sigma + angle`` per image, batched.

    Edge pixels are replicated (ImageMagick's default ``edge`` virtual pixels).
    ImageMagick (Q16) then writes 8-bit PNGs that come out truncated, not rounded:
    callers floor.
    """
    k, dx, dy = imagemagick_motion_offsets(radius, sigma, angle_deg)
    k = k.to(x.dtype)
    if x.device.type == "cpu":
        return _shifted_sum_slices(x, k.tolist(), dx.tolist(), dy.tolist())
    return _shifted_sum_gather(x, k, dx, dy)


def _shifted_sum_slices(x: Tensor, k: list[float], dx: list[list[int]], dy: list[list[int]]) -> Tensor:
    """``sum_t k[t] * x[i]`` shifted by ``(dy[i][t], dx[i][t])``, edges replicated:
    one multiply-add of a slice of the padded image per image and tap. On the CPU
    this loop (41 taps x B images) is 10x faster than the batched gathers of
    :func:`_shifted_sum_gather` (no index tensors, contiguous rows)."""
    h, w = x.shape[-2:]
    p = max(max(abs(v) for row in dx + dy for v in row), 1)
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    out = torch.empty_like(x)
    for src, dst, ox, oy in zip(padded, out, dx, dy):
        for t, kt in enumerate(k):
            view = src[..., p + oy[t] : p + oy[t] + h, p + ox[t] : p + ox[t] + w]
            if t == 0:
                torch.mul(view, kt, out=dst)
            else:
                dst.add_(view, alpha=kt)
    return out


def _shifted_sum_gather(x: Tensor, k: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """:func:`_shifted_sum_slices` as one gather per tap over the whole batch
    (per-image angles give per-image offsets, which a shared conv kernel cannot)."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    # the weights as Python floats at once (a CPU tensor from imagemagick_motion_offsets):
    # float(k[t]) of a device tensor would wait for the device at every tap
    for t, kt in enumerate(k.tolist()):
        yy = (ys[None, :] + dy[:, t : t + 1]).clamp_(0, h - 1)  # (B, H)
        xx = (xs[None, :] + dx[:, t : t + 1]).clamp_(0, w - 1)  # (B, W)
        idx = (yy[:, :, None] * w + xx[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out.add_(torch.gather(flat, 2, idx), alpha=kt)
    return out.reshape(b, c, h, w)
