"""Blur corruptions: defocus, glass, motion, zoom, Gaussian."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ._common import Context, floor_levels_
from ._filters import filter_reflect101, gaussian_nearest
from ._resample import ClippedZooms, motion_blur_im


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
    return filter_reflect101(x, disk_kernel(float(c[0]), float(c[1])))


def gaussian_blur(x: Tensor, c: float, ctx: Context) -> Tensor:
    """``skimage.filters.gaussian(sigma=c)``: truncate 4, edge replication."""
    return gaussian_nearest(x, float(c))


def _glass_sources(b: int, h: int, w: int, delta: int, d: Tensor) -> Tensor:
    """Where each pixel's value comes from after one pass of the original's "local
    pixel shuffle", faithfully, for a chunk of ``b`` images: (B, H, W) flat indices
    into the chunk.

    The original visits (h, w) for h = H-d .. d+1 and w = W-d .. d+1 (descending,
    row-major) and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with
    (dx, dy) ~ randint(-d, d). On numpy *views* that is not a swap: ``x[h, w]``
    takes the current value of ``x[h', w']`` and ``x[h', w']`` is rewritten with
    itself. Each pixel is written once, when visited, so its final value is the
    final value of its source if the source was visited earlier, else the
    source's original value. The sources form chains that only run backwards
    in visiting order, so pointer jumping (log2 of the longest chain gathers
    over the whole batch) resolves the sequential loop exactly.

    ``d``: the pass's draws, (B, rows, cols, 2) = (dx, dy) per visited pixel in
    visiting order (see :func:`glass_blur_draws`).
    """
    # Flat indices over the whole chunk in int32: index_select takes them (gather
    # wants int64) and the index maths runs 2-3x faster than in int64.
    ident, inside = _glass_grid(b, h, w, delta, str(d.device))
    rect = (slice(None), slice(delta + 1, h - delta + 1), slice(delta + 1, w - delta + 1))
    target = ident[rect]
    # the visited rectangle in ascending order: flip the draws made in visiting order
    d = d.flip(1, 2).to(torch.int32)
    offset = d[..., 1] * w + d[..., 0]  # dy * W + dx
    source = target + offset
    src = ident.clone()
    src[rect] = source
    # a source visited earlier lies in the rectangle after its target in flat
    # order (offset > 0): then the target follows it, else it stays put
    follows = inside.index_select(0, source.reshape(-1)).view_as(offset) * offset.clamp_(min=0)
    jump = ident.clone()
    jump[rect] += follows
    src, jump = src.view(-1), jump.view(-1)
    # A doubling past convergence changes nothing; where a source can lie ahead
    # (delta >= 2) chains take 3-4 doublings (ImageNet's severities 2-5 checked 4-5
    # times a pass), so the first 3 go unchecked.
    for _ in range(3 if delta >= 2 else 0):
        jump = jump.index_select(0, jump)
    while True:
        nxt = jump.index_select(0, jump)
        if torch.equal(nxt, jump):
            break
        jump = nxt
    return src.index_select(0, jump).view(b, h, w)


def _gather_pixels(img: Tensor, sources: Tensor) -> Tensor:
    """``img`` with pixel ``p`` of image ``i`` taken from flat chunk index
    ``sources[i, p]`` (in image ``i``), every channel alike."""
    b, c, h, w = img.shape
    n = h * w
    local = sources.view(b, 1, n) - sources.new_tensor(range(0, b * n, n)).view(b, 1, 1)
    return torch.gather(img.reshape(b, c, n), 2, local.long().expand(b, c, n)).reshape(b, c, h, w)


@lru_cache(maxsize=16)
def _glass_grid(b: int, h: int, w: int, delta: int, device: str) -> tuple[Tensor, Tensor]:
    """Flat int32 indices (B, H, W) over B images, and the int32 mask (B*H*W,) of
    the pixels a pass visits."""
    ident = torch.arange(b * h * w, dtype=torch.int32, device=device).reshape(b, h, w)
    inside = torch.zeros(b, h, w, dtype=torch.int32, device=device)
    inside[:, delta + 1 : h - delta + 1, delta + 1 : w - delta + 1] = 1
    return ident, inside.reshape(-1)


def glass_blur_draws(x: Tensor, c: tuple[float, int, int], ctx: Context) -> tuple[Tensor, ...]:
    """Per shuffle pass, (dx, dy) ~ randint(-delta, delta) for every visited pixel,
    in the original's order (row-major over the visiting order, which a row-major
    draw on the descending grid gives); int8, as the offsets are small."""
    delta, iters = int(c[1]), int(c[2])
    b, _, h, w = x.shape
    rows, cols = len(range(h - delta, delta, -1)), len(range(w - delta, delta, -1))
    if rows == 0 or cols == 0:
        return ()
    return tuple(ctx.rng.randint(-delta, delta, (b, rows, cols, 2), dtype=torch.int8) for _ in range(iters))


def glass_blur(x: Tensor, c: tuple[float, int, int], ctx: Context, *passes: Tensor) -> Tensor:
    """Gaussian blur, 8-bit truncation, ``c[2]`` local pixel shuffles within
    ``c[1]`` px, Gaussian blur again."""
    sigma, delta = float(c[0]), int(c[1])
    # 8-bit levels (a blur of [0, 1] values stays in [0, 1]: no clamp needed)
    y = floor_levels_(gaussian_nearest(x, sigma))
    b, _, h, w = y.shape
    sources = None
    for d in passes:  # each pass shuffles the previous pass's result
        step = _glass_sources(b, h, w, delta, d).view(-1)
        # pixel p after this pass holds what pixel step[p] held before: compose
        # the index maps and move the pixels once (the image gather costs 4x more)
        sources = step if sources is None else sources.index_select(0, step)
    return gaussian_nearest(y if sources is None else _gather_pixels(y, sources.view(b, h, w)), sigma)


def motion_blur_draws(x: Tensor, c: tuple[float, float], ctx: Context) -> tuple[Tensor]:
    return (ctx.rng.uniform((x.shape[0],), -45.0, 45.0),)


def motion_blur(x: Tensor, c: tuple[float, float], ctx: Context, angle: Tensor) -> Tensor:
    """ImageMagick motion blur (radius ``c[0]``, sigma ``c[1]``) at a uniform
    random angle in [-45, 45) degrees per image.

    ImageMagick's kernel is a one-sided half-Gaussian along the direction with
    rounded integer taps; ``kornia.filters.motion_blur`` is a uniform, centred,
    interpolated line, so the taps are built here (see ``motion_blur_im``).
    """
    return motion_blur_im(x, float(c[0]), float(c[1]), angle)


def zoom_blur(x: Tensor, c: tuple[float, ...], ctx: Context) -> Tensor:
    """Average of the image and its central zooms by each factor in ``c``."""
    out = x.clone()
    zooms = ClippedZooms(x)
    for z in c:  # <= 11 zoom factors, each a batched separable resample
        # every severity's first factor is 1, the image itself (exactly, as resampled)
        out += x if float(z) == 1.0 else zooms(float(z))
    return out.div_(len(c) + 1)
