"""Blur corruptions: defocus, glass, motion, zoom, Gaussian."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ._common import Context, clipped_zoom, filter_reflect101, gaussian_nearest, motion_blur_im


def _cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    xs = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(xs**2) / (2 * sigma * sigma))
    return k / k.sum()


@lru_cache(maxsize=None)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original ``disk``: a normalised aliased disk on a grid of at least 17x17,
    anti-aliased by ``cv2.GaussianBlur`` (3x3, or 5x5 for radius > 8; reflect-101
    border on the kernel image itself)."""
    if radius <= 8:
        grid = np.arange(-8, 8 + 1)
        ksize = 3
    else:
        grid = np.arange(-radius, radius + 1)
        ksize = 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    disk /= np.sum(disk)
    g = _cv2_gaussian_kernel(ksize, alias_blur)
    pad = ksize // 2
    padded = np.pad(disk.astype(np.float64), pad, mode="reflect")
    n = disk.shape[0]
    rows = sum(g[i] * padded[i : i + n, :] for i in range(ksize))
    out = sum(g[i] * rows[:, i : i + n] for i in range(ksize))
    return out.astype(np.float32)


def defocus_blur(x: Tensor, c: tuple[float, float], ctx: Context) -> Tensor:
    """Convolution with an anti-aliased disk (``cv2.filter2D``, reflect-101 border)."""
    k = torch.as_tensor(disk_kernel(float(c[0]), float(c[1])), dtype=x.dtype, device=x.device)
    return filter_reflect101(x, k).clamp_(0, 1)


def gaussian_blur(x: Tensor, c: float, ctx: Context) -> Tensor:
    """``skimage.filters.gaussian(sigma=c)``: truncate 4, edge replication."""
    return gaussian_nearest(x, float(c)).clamp_(0, 1)


def _glass_shuffle(img: Tensor, delta: int, rng) -> Tensor:
    """One pass of the original's "local pixel shuffle", faithfully, for a batch.

    The original visits (h, w) for h = H-d .. d+1 and w = W-d .. d+1 (descending,
    row-major) and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with
    (dx, dy) ~ randint(-d, d). On numpy *views* that is not a swap: ``x[h, w]``
    takes the current value of ``x[h', w']`` and ``x[h', w']`` is rewritten with
    itself. Each pixel is written once, when visited, so its final value is the
    final value of its source if the source was visited earlier, else the
    source's original value. The sources form chains that only run backwards
    in visiting order, so pointer jumping (log2 of the longest chain gathers
    over the whole batch) resolves the sequential loop exactly.
    """
    b, c, h, w = img.shape
    n = h * w
    dev = img.device
    rows = torch.arange(h - delta, delta, -1, device=dev)
    cols = torch.arange(w - delta, delta, -1, device=dev)
    if rows.numel() == 0 or cols.numel() == 0:
        return img
    # draw order of the original: per visited pixel, (dx, dy); row-major over the
    # visiting order, which is what a row-major draw on the descending grid gives
    d = rng.randint(-delta, delta, (b, rows.numel(), cols.numel(), 2))
    dx, dy = d[..., 0], d[..., 1]
    hh = rows[None, :, None]
    ww = cols[None, None, :]
    target = (hh * w + ww).expand(b, -1, -1).reshape(b, -1)
    source = ((hh + dy) * w + (ww + dx)).reshape(b, -1)
    src = torch.arange(n, device=dev).expand(b, n).clone()
    src.scatter_(1, target, source)
    visited = torch.zeros(b, n, dtype=torch.bool, device=dev)
    visited[:, (rows[:, None] * w + cols[None, :]).reshape(-1)] = True
    pos = torch.arange(n, device=dev).expand(b, n)
    # flat index order is the reverse of the visiting order inside the rectangle
    src_visited_first = torch.gather(visited, 1, src) & (src > pos) & visited
    jump = torch.where(src_visited_first, src, pos)
    while True:
        nxt = torch.gather(jump, 1, jump)
        if torch.equal(nxt, jump):
            break
        jump = nxt
    final_src = torch.gather(src, 1, jump)
    flat = img.reshape(b, c, n)
    return torch.gather(flat, 2, final_src[:, None].expand(b, c, n)).reshape(b, c, h, w)


def glass_blur(x: Tensor, c: tuple[float, int, int], ctx: Context) -> Tensor:
    """Gaussian blur, 8-bit truncation, ``c[2]`` local pixel shuffles within
    ``c[1]`` px, Gaussian blur again."""
    sigma, delta, iters = float(c[0]), int(c[1]), int(c[2])
    y = torch.floor(gaussian_nearest(x, sigma) * 255 + 1e-3).clamp_(0, 255) / 255
    for _ in range(iters):  # each pass shuffles the previous pass's result
        y = _glass_shuffle(y, delta, ctx.rng)
    return gaussian_nearest(y, sigma).clamp_(0, 1)


def motion_blur(x: Tensor, c: tuple[float, float], ctx: Context) -> Tensor:
    """ImageMagick motion blur (radius ``c[0]``, sigma ``c[1]``) at a uniform
    random angle in [-45, 45) degrees per image.

    ImageMagick's kernel is a one-sided half-Gaussian along the direction with
    rounded integer taps; ``kornia.filters.motion_blur`` is a uniform, centred,
    interpolated line, so the taps are built here (see ``motion_blur_im``).
    """
    angle = ctx.rng.uniform((x.shape[0],), -45.0, 45.0)
    y = motion_blur_im(x, float(c[0]), float(c[1]), angle)
    return y.clamp_(0, 1)


def zoom_blur(x: Tensor, c: tuple[float, ...], ctx: Context) -> Tensor:
    """Average of the image and its central zooms by each factor in ``c``."""
    out = x.clone()
    for z in c:  # <= 11 zoom factors, each a batched separable resample
        out += clipped_zoom(x, float(z))
    return (out / (len(c) + 1)).clamp_(0, 1)
