"""Shared helpers: random streams, filters with the original code's border rules,
resampling matrices and quantisation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import filter2d, filter2d_separable
from torch import Tensor

# Float-to-uint8 tolerance: ``np.uint8`` truncates, and a float32 result that lands a
# hair below an integer (255 * (v / 255) in float32) would otherwise lose a level.
_FLOOR_EPS = 1e-3


class Rng:
    """Random draws from a ``torch.Generator`` (or the global RNG), made on the
    generator's device and moved to the images' device, so one seed gives the same
    corruption whatever device the images live on.

    With a sequence of generators, one per image, every draw (whose first
    dimension is always the batch) takes image ``i``'s part from generator ``i``:
    an image's corruption then depends on its own generator only, not on which
    other images share its batch or where it sits in it. torch has no batched draw
    with per-sample seeds, so this mode loops over the images for the draws only
    (the corruption itself stays batched); its cost is measured in
    ``benchmarks/per_image_seeding_cost.py`` (RESULTS.md)."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None,
                 device: torch.device, dtype: torch.dtype):
        if generator is None or isinstance(generator, torch.Generator):
            self.generator, self.generators = generator, None
            self.source = generator.device if generator is not None else device
        else:
            self.generator, self.generators = None, list(generator)
            self.source = self.generators[0].device
        self.device = device
        self.dtype = dtype

    def _out(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        if not shape or shape[0] != len(self.generators):
            raise RuntimeError(
                f"a per-image draw of shape {shape} does not lead with the batch of {len(self.generators)}"
            )

    def _draw(self, shape: tuple[int, ...], fill: Callable[[Tensor, torch.Generator | None], Tensor],
              dtype: torch.dtype = torch.float32) -> Tensor:
        """A tensor of ``shape`` filled in place by ``fill(tensor, generator)`` (what
        ``torch.rand``/``randn``/``randint`` do inside, so one generator gives their
        numbers); per image, each image's slice from its own generator (a stack of
        per-image draws would cost another pass over the batch)."""
        out = torch.empty(shape, dtype=dtype, device=self.source)
        if self.generators is None:
            fill(out, self.generator)
            return out
        self._check_batch(shape)
        for part, g in zip(out, self.generators):
            fill(part, g)
        return out

    def uniform(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> Tensor:
        # always drawn in float32, so float64 inputs see the same random numbers
        u = self._draw(shape, lambda t, g: t.uniform_(generator=g))
        if (low, high) != (0.0, 1.0):  # in place: these tensors are image-sized
            u.mul_(high - low).add_(low)
        return self._out(u)

    def normal(self, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> Tensor:
        n = self._draw(shape, lambda t, g: t.normal_(generator=g))
        if std != 1.0:
            n.mul_(std)
        if mean != 0.0:
            n.add_(mean)
        return self._out(n)

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> Tensor:
        """Integers in ``[low, high)``, like ``np.random.randint``."""
        return self._out(self._draw(shape, lambda t, g: t.random_(low, high, generator=g), torch.int64))

    def randint_below(self, high: Tensor) -> Tensor:
        """One integer in ``[0, high[i])`` per entry of the integer tensor ``high``."""
        u = self._draw(tuple(high.shape), lambda t, g: t.uniform_(generator=g), torch.float64)
        return self._out(torch.floor(u * high.to(self.source, torch.float64)).long())

    def poisson(self, rates: Tensor) -> Tensor:
        rates = rates.to(self.source, torch.float32)
        if self.generators is None:
            return self._out(torch.poisson(rates, generator=self.generator))
        self._check_batch(tuple(rates.shape))
        out = torch.empty_like(rates)
        for part, r, g in zip(out, rates, self.generators):
            part.copy_(torch.poisson(r, generator=g))
        return self._out(out)


@dataclass
class Context:
    """Everything a corruption needs besides the images and its severity row."""

    rng: Rng
    preset: str
    table: dict[str, Any]
    quantize: bool
    frost_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def quantize_floor(x: Tensor) -> Tensor:
    """``np.uint8(v * 255) / 255``: the original truncates its float results."""
    # one allocation, then in place: a pass over the batch costs as much as the noise
    return (x * 255).add_(_FLOOR_EPS).floor_().clamp_(0, 255).div_(255)


def round_half_up(v: Tensor) -> Tensor:
    # torch.round rounds ties to even; C code doing (v + 0.5) >> 0 rounds them up.
    return torch.floor(v + 0.5)


def quantize_round(x: Tensor) -> Tensor:
    """Nearest 8-bit level, for corruptions whose original returns 8-bit images
    from Pillow (resize, JPEG), which rounds."""
    return (x * 255).add_(0.5).floor_().clamp_(0, 255).div_(255)


# ----------------------------------------------------------------------------- filters


@lru_cache(maxsize=None)
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised."""
    radius = int(truncate * float(sigma) + 0.5)
    xs = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * xs**2) if sigma > 0 else (xs == 0).astype(np.float64)
    return phi / phi.sum()


def gaussian_nearest(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """``skimage.filters.gaussian(..., channel_axis=-1)`` on NCHW: scipy's
    ``gaussian_filter`` with ``mode='nearest'`` (edge replication)."""
    k = gaussian_kernel1d(float(sigma), truncate)
    if k.size == 1:
        return x
    kt = torch.as_tensor(k, dtype=x.dtype, device=x.device)[None]
    return filter2d_separable(x, kt, kt, border_type="replicate")


@lru_cache(maxsize=64)
def symmetric_filter_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """Dense ``n x n`` matrix of a 1-D Gaussian with scipy ``mode='reflect'``.

    The original smooths elastic displacement noise with sigmas up to 171 px and
    ``truncate=3``: kernels far wider than the image. Folding the kernel onto the
    periodic symmetric extension gives a small matrix, applied as a matmul.
    """
    k = gaussian_kernel1d(sigma, truncate)
    radius = k.size // 2
    taps = np.arange(-radius, radius + 1)
    out = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)[:, None]
    src = rows + taps[None, :]
    src = np.remainder(src, 2 * n)
    src = np.where(src >= n, 2 * n - 1 - src, src)
    np.add.at(out, (np.broadcast_to(rows, src.shape), src), np.broadcast_to(k, src.shape))
    return out


def filter_reflect101(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlation with a 2-D kernel, OpenCV ``filter2D`` border (reflect-101).

    Small kernels go through Kornia's ``filter2d``; large ones (the 21x21 defocus
    disks) through an FFT of the padded images, which is what OpenCV does too and
    is several times faster than a dense depthwise convolution on the CPU.
    """
    kh, kw = kernel.shape[-2:]
    if kh * kw <= 121 or x.shape[-2] <= kh // 2 or x.shape[-1] <= kw // 2:
        return filter2d(x, kernel[None], border_type="reflect")
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    fh, fw = padded.shape[-2:]
    # correlation = convolution with the flipped kernel; the circular wrap only
    # touches the padding, which is cropped away
    kf = torch.fft.rfft2(torch.flip(kernel, (-2, -1)), s=(fh, fw))
    out = torch.fft.irfft2(torch.fft.rfft2(padded) * kf, s=(fh, fw))
    return out[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


# --------------------------------------------------------------------------- resampling


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


def pixel_grid(ys: Tensor, xs: Tensor, h: int, w: int, align_corners: bool) -> Tensor:
    """``grid_sample`` grid from pixel coordinates ``ys``/``xs`` (same shape, any
    leading dims), for an ``h x w`` source."""
    if align_corners:
        gx = xs * (2.0 / max(w - 1, 1)) - 1
        gy = ys * (2.0 / max(h - 1, 1)) - 1
    else:
        gx = (2 * xs + 1) / w - 1
        gy = (2 * ys + 1) / h - 1
    return torch.stack((gx, gy), -1)


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """The original ``clipped_zoom`` on NCHW: linear zoom about the centre,
    corner-aligned like ``scipy.ndimage.zoom(order=1)``, as one ``grid_sample``."""
    b, _, h, w = x.shape
    ys, _ = scipy_zoom_coords(h, zoom)
    xs, _ = scipy_zoom_coords(w, zoom)
    ys_t = torch.as_tensor(ys, device=x.device, dtype=torch.float64)
    xs_t = torch.as_tensor(xs, device=x.device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys_t, xs_t, indexing="ij")
    grid = pixel_grid(gy, gx, h, w, align_corners=True).to(x.dtype)
    grid = grid[None].expand(b, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


# ------------------------------------------------------------------------- motion blur


def imagemagick_motion_offsets(radius: float, sigma: float, angle_deg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Taps of ImageMagick's ``MotionBlurImage``: a one-sided Gaussian of width
    ``2*ceil(radius)+1`` laid along ``angle`` with integer (rounded-up) offsets.

    Returns ``(weights (K,), dx (B, K), dy (B, K))``.
    """
    width = int(2 * math.ceil(radius) + 1) if radius > 1e-12 else 3
    sig = sigma if abs(sigma) > 1e-12 else 1e-12
    i = torch.arange(width, dtype=torch.float64, device=angle_deg.device)
    k = torch.exp(-(i * i) / (2 * sig * sig))
    k = k / k.sum()
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
    b, c, h, w = x.shape
    k, dx, dy = imagemagick_motion_offsets(radius, sigma, angle_deg)
    k = k.to(x.dtype)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    flat = x.reshape(b, c, h * w)
    out = torch.zeros_like(flat)
    # One gather per tap (at most 41), each covering the whole batch: per-image
    # angles give per-image integer offsets, which a shared conv kernel cannot.
    for t in range(k.numel()):
        yy = (ys[None, :] + dy[:, t : t + 1]).clamp_(0, h - 1)  # (B, H)
        xx = (xs[None, :] + dx[:, t : t + 1]).clamp_(0, w - 1)  # (B, W)
        idx = (yy[:, :, None] * w + xx[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out.add_(torch.gather(flat, 2, idx), alpha=float(k[t]))
    return out.reshape(b, c, h, w)
