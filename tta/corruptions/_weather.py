"""Weather corruptions: snow, frost, fog, spatter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Context, Rng, floor_levels_, zero_below_
from ._filters import gaussian_nearest, pad_reflect101
from ._resample import clipped_zoom, motion_blur_im
from ._frost import load_frost_textures


def _roll(t: Tensor, shift: int, dim: int) -> Tensor:
    return torch.roll(t, shifts=shift, dims=dim)


def plasma_draws(batch: int, mapsize: int, wibbledecay: float, rng: Rng) -> Tensor:
    """The random numbers of :func:`plasma_fractal`, (B, N): per level of the
    diamond-square refinement, U(-wibble, wibble) for the squares, then for the two
    diamond sets (the original's order), flattened and concatenated."""
    parts = []
    step, wibble = mapsize, 100.0
    while step >= 2:
        n = mapsize // step
        parts += [rng.uniform((batch, n, n), -wibble, wibble).reshape(batch, -1) for _ in range(3)]
        step //= 2
        wibble /= wibbledecay
    return torch.cat(parts, 1)


def plasma_fractal(draws: Tensor, mapsize: int, wibbledecay: float) -> Tensor:
    """The original's diamond-square heightmap, one per image, in [0, 1], from the
    random numbers :func:`plasma_draws` made.

    Same law as ImageNet-C (wrap-around neighbours via ``roll``, midpoint = mean of
    4 + wibble * U(-wibble, wibble), wibble /= decay per level), vectorised over the
    batch. Not ``kornia.contrib.diamond_square``: that one mixes mean and noise with
    a per-level weight on a non-wrapping 2^n + 1 grid, which gives other fog.
    """
    assert mapsize & (mapsize - 1) == 0, "mapsize must be a power of two"
    batch = draws.shape[0]
    m = torch.zeros(batch, mapsize, mapsize, dtype=draws.dtype, device=draws.device)
    step = mapsize
    wibble = 100.0
    used = 0

    def wibbled_mean(a: Tensor) -> Tensor:
        nonlocal used
        u = draws[:, used : used + a[0].numel()].reshape(a.shape)
        used += a[0].numel()
        return a / 4 + wibble * u

    while step >= 2:  # log2(mapsize) levels, each refining the previous one
        half = step // 2
        corners = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corners + _roll(corners, -1, 1)
        sq = sq + _roll(sq, -1, 2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + _roll(dr, 1, 1) + ul + _roll(ul, -1, 2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = dr + _roll(dr, 1, 2) + ul + _roll(ul, -1, 1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _plasma_mapsize(x: Tensor, ctx: Context) -> int:
    # the original's map (256 / 64 / 32) is cropped to the image; larger images get
    # the next power of two instead of failing
    h, w = x.shape[-2:]
    return max(int(ctx.table["_plasma_mapsize"]), 1 << math.ceil(math.log2(max(h, w))))


def fog_draws(x: Tensor, c: tuple[float, float], ctx: Context) -> tuple[Tensor]:
    """The plasma fractals, made here a few maps at a time: a map is some 300 steps,
    too small to pay their Python overhead image by image, while batch-sized steps
    run out of cache (4 MB of maps per step, 16 at 256 px: 3.2x faster than one
    at a time, 2.2x faster than 64 at once; one thread)."""
    b, _, h, w = x.shape
    mapsize = _plasma_mapsize(x, ctx)
    draws = plasma_draws(b, mapsize, float(c[1]), ctx.rng)
    plasma = torch.empty((b, 1, h, w), dtype=draws.dtype, device=draws.device)
    step = b if x.device.type != "cpu" else max(1, (1 << 20) // mapsize**2)
    for i in range(0, b, step):
        plasma[i : i + step, 0] = plasma_fractal(draws[i : i + step], mapsize, float(c[1]))[:, :h, :w]
    return (plasma,)


def fog(x: Tensor, c: tuple[float, float], ctx: Context, plasma: Tensor) -> Tensor:
    """Add ``c[0]`` x plasma fractal (decay ``c[1]``), rescale by max/(max + c[0])."""
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    y = x + c[0] * plasma
    return y.mul_(max_val).div_(max_val + c[0])


# (id(loaded texture list), h, w) -> the five usable textures, large enough for h x w
_USABLE: dict[tuple[int, int, int], list[Tensor]] = {}
# id(usable texture list) -> (flat stack (3, N), heights, widths, row stride, plane size)
_STACKS: dict[int, tuple[Tensor, Tensor, Tensor, int, int]] = {}


def _frost_usable(x: Tensor, ctx: Context) -> list[Tensor]:
    """The five textures the original draws from (cached), upscaled first when the
    images are larger than a texture (not in the original, which only ever crops
    224/64/32 px)."""
    h, w = x.shape[-2:]
    loaded = load_frost_textures(ctx.frost_dir, float(ctx.table["_frost_rescale"]), x.device)
    key = (id(loaded), h, w)  # the loader caches its list: a stable key
    if key not in _USABLE:
        textures = loaded[:5]
        need = max((h + 1) / min(t.shape[1] for t in textures), (w + 1) / min(t.shape[2] for t in textures))
        if need > 1:
            textures = [
                F.interpolate(t[None].float(), scale_factor=need, mode="bilinear", align_corners=False)[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
                for t in textures
            ]
        _USABLE[key] = textures
    return _USABLE[key]


def _frost_stack(textures: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """The textures padded into one flat uint8 tensor (cached), for the gathers."""
    key = id(textures)
    if key in _STACKS:
        return _STACKS[key]
    dev = textures[0].device
    th = torch.tensor([t.shape[1] for t in textures], device=dev)
    tw = torch.tensor([t.shape[2] for t in textures], device=dev)
    hmax, wmax = int(th.max()), int(tw.max())
    stack = torch.zeros(3, len(textures), hmax, wmax, dtype=torch.uint8, device=dev)
    for i, t in enumerate(textures):  # five textures, not images
        stack[:, i, : t.shape[1], : t.shape[2]] = t
    entry = (stack.reshape(3, -1), th, tw, wmax, hmax * wmax)
    _STACKS[key] = entry
    return entry


def frost_draws(x: Tensor, c: tuple[float, float], ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
    """Texture (the original draws ``randint(5)``, so ``frost6.jpg`` is never used),
    then the crop's top and left corner."""
    b, _, h, w = x.shape
    textures = _frost_usable(x, ctx)
    th = torch.tensor([t.shape[1] for t in textures], device=x.device)
    tw = torch.tensor([t.shape[2] for t in textures], device=x.device)
    idx = ctx.rng.randint(0, len(textures), (b,))
    top = ctx.rng.randint_below(th[idx] - h)
    left = ctx.rng.randint_below(tw[idx] - w)
    return idx, top, left


def _frost_crops(x: Tensor, textures: list[Tensor], idx: Tensor, top: Tensor, left: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) crops of the textures: slices on the CPU (a copy per
    image: 10x faster than the gather), one gather over the batch elsewhere."""
    if x.device.type == "cpu":
        return _frost_crops_sliced(x.shape[-2:], textures, idx, top, left)
    return _frost_crops_gathered(x.shape[-2:], textures, idx, top, left)


def _frost_crops_sliced(size: torch.Size, textures: list[Tensor], idx: Tensor, top: Tensor, left: Tensor) -> Tensor:
    h, w = size
    crops = [textures[i][:, t : t + h, l : l + w] for i, t, l in zip(idx.tolist(), top.tolist(), left.tolist())]
    return torch.stack(crops)


def _frost_crops_gathered(size: torch.Size, textures: list[Tensor], idx: Tensor, top: Tensor, left: Tensor) -> Tensor:
    h, w = size
    dev = textures[0].device
    flat, _, _, stride, plane = _frost_stack(textures)
    rows = top[:, None] + torch.arange(h, device=dev)
    cols = left[:, None] + torch.arange(w, device=dev)
    where = idx[:, None, None] * plane + rows[:, :, None] * stride + cols[:, None, :]  # (B, H, W)
    return flat[:, where.reshape(-1)].reshape(3, idx.shape[0], h, w).transpose(0, 1)


def frost(x: Tensor, c: tuple[float, float], ctx: Context, idx: Tensor, top: Tensor, left: Tensor) -> Tensor:
    """Blend with a random crop of one of the first five frost textures."""
    crop = _frost_crops(x, _frost_usable(x, ctx), idx, top, left).to(x.dtype)
    return (x * c[0]).add_(crop.mul_(c[1] / 255))


def snow_draws(x: Tensor, c: tuple[float, ...], ctx: Context) -> tuple[Tensor, Tensor]:
    b, _, h, w = x.shape
    flakes = ctx.rng.normal((b, 1, h, w), float(c[0]), float(c[1]))
    return flakes, ctx.rng.uniform((b,), -135.0, -45.0)


def snow(x: Tensor, c: tuple[float, ...], ctx: Context, flakes: Tensor, angle: Tensor) -> Tensor:
    """Zoomed, thresholded Gaussian flakes, motion-blurred by ImageMagick at an angle
    in [-135, -45) degrees, added twice (and rotated 180 degrees) over a greyed,
    brightened image."""
    flakes = clipped_zoom(flakes, float(c[2]))
    zero_below_(flakes, c[3])
    # the original round-trips the layer through an 8-bit PNG and ImageMagick
    flakes = floor_levels_(flakes.clamp_(0, 1))
    flakes = floor_levels_(motion_blur_im(flakes, float(c[4]), float(c[5]), angle))
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) * 1.5 + 0.5
    y = (x * c[6]).add_(torch.maximum(x, grey).mul_(1 - c[6]))
    return y.add_(flakes).add_(torch.rot90(flakes, 2, dims=(-2, -1)))


def _shift(t: Tensor, dy: int, dx: int, fill: float) -> Tensor:
    """``out[..., i, j] = t[..., i + dy, j + dx]``, ``fill`` outside the image."""
    h, w = t.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(t, (p, p, p, p), value=fill)
    return padded[..., p + dy : p + dy + h, p + dx : p + dx + w]


def _canny(img: Tensor, low: int = 50, high: int = 150) -> Tensor:
    """``cv2.Canny(img, low, high)`` (3x3 Sobel with replicated border, L1
    magnitude, OpenCV's fixed-point direction sectors and asymmetric non-maximum
    comparisons, 8-connected hysteresis) on uint8-valued (B, 1, H, W) float input."""
    v = F.pad(img.double(), (1, 1, 1, 1), mode="replicate")
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=v.dtype, device=v.device)
    gx = F.conv2d(v, sobel_x[None, None]).long()
    gy = F.conv2d(v, sobel_x.T.contiguous()[None, None]).long()
    mag = gx.abs() + gy.abs()
    ax = gx.abs()
    ay = gy.abs() << 15
    tg22x = ax * 13573  # round(tan(22.5 deg) * 2^15)
    tg67x = tg22x + (ax << 16)
    horiz = ay < tg22x
    vert = ~horiz & (ay > tg67x)
    diag = ~horiz & ~vert
    s_pos = (gx ^ gy) >= 0  # same signs: compare up-left / down-right
    m = mag

    def nb(dy: int, dx: int) -> Tensor:
        return _shift(m, dy, dx, 0)

    is_max = (
        (horiz & (m > nb(0, -1)) & (m >= nb(0, 1)))
        | (vert & (m > nb(-1, 0)) & (m >= nb(1, 0)))
        | (diag & s_pos & (m > nb(-1, -1)) & (m > nb(1, 1)))
        | (diag & ~s_pos & (m > nb(-1, 1)) & (m > nb(1, -1)))
    )
    weak = is_max & (m > low)
    edges = weak & (m > high)
    weak_f = weak.to(img.dtype)
    edges_f = edges.to(img.dtype)
    # Hysteresis grows strong edges along weak ones: a flood fill, inherently
    # iterative; each step is one batched 3x3 dilation, until nothing changes.
    while True:
        grown = F.max_pool2d(edges_f, 3, stride=1, padding=1) * weak_f
        grown = torch.maximum(grown, edges_f)
        if torch.equal(grown, edges_f):
            break
        edges_f = grown
    return edges_f * 255


def _chamfer_distance(zero: Tensor, cap: float) -> Tensor:
    """``cv2.distanceTransform(src, DIST_L2, 5)`` (5x5 chamfer: 1, 1.4, 2.1969) to
    the pixels where ``zero`` is true, exact up to ``cap``; pixels outside the image
    are never sources. Min-plus relaxation: every path of cost <= cap has <= cap
    steps, so at most ``cap + 1`` batched sweeps."""
    big = cap + 10.0
    d = torch.where(zero, torch.zeros_like(zero, dtype=torch.float32), torch.full_like(zero, big, dtype=torch.float32))
    moves = [(0, 1, 1.0), (0, -1, 1.0), (1, 0, 1.0), (-1, 0, 1.0)]
    moves += [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
    moves += [(dy, dx, 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))]
    for _ in range(int(cap) + 2):
        new = d
        for dy, dx, cost in moves:
            new = torch.minimum(new, _shift(d, dy, dx, big) + cost)
        new = new.clamp_(max=big)
        if torch.equal(new, d):
            break
        d = new
    return d


def _box3_reflect101(t: Tensor) -> Tensor:
    """``cv2.blur(t, (3, 3))``: 3x3 mean, reflect-101 border."""
    return F.avg_pool2d(pad_reflect101(t, 1, 1), 3, stride=1)


def _equalize_hist(u8: Tensor) -> Tensor:
    """``cv2.equalizeHist`` per image on uint8-valued (B, 1, H, W) float input."""
    b = u8.shape[0]
    flat = u8.reshape(b, -1).long()
    total = flat.shape[1]
    hist = torch.zeros(b, 256, dtype=torch.long, device=u8.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(dim=1, keepdim=True)  # lowest level present
    first_count = torch.gather(hist, 1, first)
    levels = torch.arange(256, device=u8.device)[None]
    cum = torch.cumsum(hist, 1) - first_count  # sum over levels first+1 .. i
    scale = 255.0 / (total - first_count).clamp_min(1).float()  # float32, as OpenCV
    lut = torch.round(cum.float() * scale).clamp_(0, 255)  # saturate_cast rounds half to even
    lut = torch.where(levels <= first, torch.zeros_like(lut), lut)
    constant = first_count == total  # one level only: OpenCV fills with it
    lut = torch.where(constant, first.float().expand_as(lut), lut)
    return torch.gather(lut, 1, flat).reshape(u8.shape).to(u8.dtype)


def spatter_draws(x: Tensor, c: tuple[float, ...], ctx: Context) -> tuple[Tensor]:
    b, _, h, w = x.shape
    return (ctx.rng.normal((b, 1, h, w), float(c[0]), float(c[1])),)


def spatter(x: Tensor, c: tuple[float, ...], ctx: Context, liquid: Tensor) -> Tensor:
    """Water drops (mode 0: edge-distance shaded turquoise) or mud (mode 1: brown
    blobs) from a smoothed, thresholded Gaussian liquid layer; the water branch
    reproduces the original's OpenCV chain (Canny, chamfer distance transform,
    histogram equalisation, emboss filter, box blurs) with its uint8 steps."""
    liquid = gaussian_nearest(liquid, float(c[2]))
    liquid = zero_below_(liquid, c[3])
    if c[5] == 0:
        # astype(uint8) truncates and wraps above 255
        liq8 = torch.remainder(torch.floor(liquid * 255), 256)
        edges = _canny(liq8)
        dist = _chamfer_distance(edges > 0, 20.0).clamp_(max=20.0).to(x.dtype)
        dist = torch.floor(_box3_reflect101(dist) + 1e-4)
        dist = _equalize_hist(dist)
        emboss = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=x.dtype, device=x.device)
        dist = F.conv2d(pad_reflect101(dist, 1, 1), emboss[None, None]).clamp_(0, 255)
        dist = torch.round(_box3_reflect101(dist))
        m = liq8 * dist
        peak = m.amax(dim=(2, 3), keepdim=True)
        m = torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m)) * c[4]
        color = torch.tensor([175 / 255.0, 238 / 255.0, 238 / 255.0], dtype=x.dtype, device=x.device)
        return x + m * color.view(1, 3, 1, 1)
    m = (liquid > c[3]).to(x.dtype)
    m = gaussian_nearest(m, float(c[4]))
    m = zero_below_(m, 0.8)
    color = torch.tensor([63 / 255.0, 42 / 255.0, 20 / 255.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * (1 - m) + color * m
