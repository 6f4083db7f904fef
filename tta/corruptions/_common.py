"""Shared helpers: random streams, filters with the original code's border rules,
resampling matrices and quantisation."""

from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import filter2d
from torch import Tensor

# Float-to-uint8 tolerance: ``np.uint8`` truncates, and a float32 result that lands a
# hair below an integer (255 * (v / 255) in float32) would otherwise lose a level.
_FLOOR_EPS = 1e-3


# Batch-sized CPU tensors ask for transparent huge pages (``madvise``). A tensor
# this large (glibc maps it fresh from the kernel) is otherwise faulted in 4 KB at a
# time when first written: 0.3 ms per 224 px image on the test machine, more than
# the whole of several corruptions; 2 MB pages cut that 3x. torch does the same
# for every large tensor when THP_MEM_ALLOC_ENABLE=1 is set before it starts.
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
USE_HUGE_PAGES = True


def new_batch(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """``torch.empty``, with the huge-page hint for a large CPU tensor (Linux)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    madvise = _madvise() if out.device.type == "cpu" and USE_HUGE_PAGES else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + out.numel() * out.element_size()) // _HUGE_PAGE * _HUGE_PAGE
        if end - start >= 2 * _HUGE_PAGE:
            madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return out


@lru_cache(maxsize=None)
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


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
        out = new_batch(shape, dtype, self.source)
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

    def randint(self, low: int, high: int, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> Tensor:
        """Integers in ``[low, high)``, like ``np.random.randint``; a smaller ``dtype``
        holds the same numbers (one 32-bit draw each whatever the dtype)."""
        return self._out(self._draw(shape, lambda t, g: t.random_(low, high, generator=g), dtype))

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
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A scratch tensor of ``shape`` kept for the chunks of one call (the last,
        smaller chunk gets its leading part). glibc hands the temporaries of a
        chunk back to the kernel when they are freed together, and the next chunk
        faults them in again page by page: on a fresh process that doubled the
        time of the noises; reused buffers fault once."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or (buf.dtype, buf.device) != (
            dtype,
            torch.device(device),
        ):
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf[: shape[0]]


def quantize_floor_into(y: Tensor, out: Tensor) -> Tensor:
    """``out = np.uint8(y * 255) / 255`` (clipped): the original truncates its float
    results. ``y`` is scratch (overwritten)."""
    return torch.div(y.mul_(255).add_(_FLOOR_EPS).floor_().clamp_(0, 255), 255, out=out)


def zero_below_(t: Tensor, threshold: float) -> Tensor:
    """``torch.where(t < threshold, 0, t)`` in place, by multiplying with
    ``clamp(sign(t - threshold) + 1, 0, 1)``: the sign of a float difference is
    exact, and float ops run 10-20x faster than masked_fill or where (bool tensors)
    on the CPU."""
    return t.mul_((t - threshold).sign_().add_(1).clamp_(0, 1))


def to_uint8(x: Tensor, memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    """8-bit levels of images in [0, 1], rounded half up (as the original's uint8
    images are made). Truncating ``x * 255 + 0.5`` is the rounding for values >= 0;
    through int16 because float-to-uint8 conversion runs 4x slower on the CPU."""
    return scaled_half_up(x).to(torch.int16).to(torch.uint8, memory_format=memory_format)


def scaled_half_up(x: Tensor) -> Tensor:
    """``x * 255 + 0.5`` in one pass (a fused multiply-add, 1.7x faster than two
    steps; its ``floor``, the 8-bit level rounded half up, is that of two roundings
    but within a float epsilon of a rounding boundary, far from the 8-bit levels
    images come in)."""
    return torch.add(torch.full((), 0.5, dtype=x.dtype, device=x.device), x, alpha=255)


def round_half_up(v: Tensor) -> Tensor:
    # torch.round rounds ties to even; C code doing (v + 0.5) >> 0 rounds them up.
    return torch.floor(v + 0.5)


def quantize_round_into(y: Tensor, out: Tensor) -> Tensor:
    """``out`` = nearest 8-bit level of ``y`` (clipped), for corruptions whose
    original returns 8-bit images from Pillow (resize, JPEG), which rounds. ``y``
    is scratch (overwritten)."""
    return torch.div(y.mul_(255).add_(0.5).floor_().clamp_(0, 255), 255, out=out)


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
    taps = torch.as_tensor(k, dtype=x.dtype).tolist()
    return correlate1d(correlate1d(x, taps, -1), taps, -2)


def correlate1d(x: Tensor, taps: list[float], dim: int, border: str = "replicate") -> Tensor:
    """Correlation with an odd 1-D kernel along ``dim`` (-1 or -2); ``border``:
    ``"replicate"`` (scipy ``nearest``) or ``"symmetric"`` (scipy ``reflect``,
    kernel radius below the size).

    One multiply-add of a shifted slice per tap: on one CPU thread 3-5x faster than
    the depthwise convolution Kornia's ``filter2d_separable`` runs (oneDNN, 13 taps,
    224 px), with the same result bit for bit (same tap order, fused multiply-adds).
    """
    r = len(taps) // 2
    n = x.shape[dim]
    if border == "replicate":
        padded = F.pad(x, (r, r, 0, 0) if dim == -1 else (0, 0, r, r), mode="replicate")
    else:
        edge = (x.narrow(dim, 0, r).flip(dim), x, x.narrow(dim, n - r, r).flip(dim))
        padded = torch.cat(edge, dim)
    out = padded.narrow(dim, 0, n) * taps[0]
    for t in range(1, len(taps)):
        out.add_(padded.narrow(dim, t, n), alpha=taps[t])
    return out


def gaussian_reflect(x: Tensor, sigma: float, truncate: float, scale: float = 1.0) -> Tensor:
    """``scale`` x scipy's ``gaussian_filter(mode='reflect')`` (half-sample
    symmetric border) over the last two dimensions: shifted slices per tap where
    the kernel is narrower than the images, else the dense matrices of
    :func:`symmetric_filter_matrix` (the original smooths elastic displacements
    with sigmas up to 171 px and ``truncate=3``: kernels far wider than the image).
    """
    k = gaussian_kernel1d(sigma, truncate)
    h, w = x.shape[-2:]
    if k.size // 2 < min(h, w):
        taps = torch.as_tensor(k, dtype=x.dtype).tolist()
        scaled = torch.as_tensor(k * scale, dtype=x.dtype).tolist()
        return correlate1d(correlate1d(x, taps, -2, "symmetric"), scaled, -1, "symmetric")
    ah = torch.as_tensor(symmetric_filter_matrix(h, sigma, truncate), dtype=x.dtype, device=x.device)
    aw = torch.as_tensor(symmetric_filter_matrix(w, sigma, truncate) * scale, dtype=x.dtype, device=x.device)
    return ah @ x @ aw.T


@lru_cache(maxsize=64)
def symmetric_filter_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """Dense ``n x n`` matrix of a 1-D Gaussian with scipy ``mode='reflect'``:
    the kernel folded onto the periodic symmetric extension, for any width."""
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


def filter_reflect101(x: Tensor, kernel: np.ndarray) -> Tensor:
    """Correlation with a 2-D kernel, OpenCV ``filter2D`` border (reflect-101).

    Through an FFT of the padded images, as OpenCV does for kernels this large (the
    17x17 to 21x21 defocus disks): several times faster than a dense depthwise
    convolution on the CPU. Tiny images that cannot be reflect-padded by the
    kernel's radius go through Kornia's ``filter2d``.
    """
    kernel = np.ascontiguousarray(kernel, dtype=np.float32)
    kh, kw = kernel.shape[-2:]
    if x.shape[-2] <= kh // 2 or x.shape[-1] <= kw // 2:
        k = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)
        return filter2d(x, k[None], border_type="reflect")
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    # a 5-smooth transform size at least the padded size (224 px: 250, not 244 =
    # 4 x 61, 1.5-2x faster): the circular wrap still only reaches the padding,
    # which is cropped away
    fh, fw = _fft_size(h + 2 * ph), _fft_size(w + 2 * pw)
    spectrum = _kernel_spectrum(kernel.tobytes(), kernel.shape, fh, fw, x.dtype, str(x.device))
    out = torch.fft.irfft2(torch.fft.rfft2(padded, s=(fh, fw)) * spectrum, s=(fh, fw))
    return out[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (pocketfft's and cuFFT's fast lengths)."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


@lru_cache(maxsize=32)
def _kernel_spectrum(
    kernel: bytes, shape: tuple[int, int], fh: int, fw: int, dtype: torch.dtype, device: str
) -> Tensor:
    """rfft2 of the flipped kernel (correlation = convolution with the flip), cached:
    per chunk of images it would cost as much as one image plane."""
    k = torch.as_tensor(np.frombuffer(kernel, dtype=np.float32).reshape(shape).copy(), dtype=dtype)
    return torch.fft.rfft2(torch.flip(k, (-2, -1)).to(device), s=(fh, fw))


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
    for t in range(k.numel()):
        yy = (ys[None, :] + dy[:, t : t + 1]).clamp_(0, h - 1)  # (B, H)
        xx = (xs[None, :] + dx[:, t : t + 1]).clamp_(0, w - 1)  # (B, W)
        idx = (yy[:, :, None] * w + xx[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out.add_(torch.gather(flat, 2, idx), alpha=float(k[t]))
    return out.reshape(b, c, h, w)
