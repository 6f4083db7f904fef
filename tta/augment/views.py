"""Augmented views of test images (TPT, RLCF; the selection of confident views
and TPT's loss are in :mod:`tta.methods.clip_views`).

TPT (Shu et al., NeurIPS 2022) and RLCF (Zhao et al., ICLR 2024) look at each test
image through N views: the image itself plus N-1 random resized crops (with a random
horizontal flip, and AugMix on top for fine-grained datasets), keep the most
confident fraction of the views (lowest prediction entropy) and adapt on those.

Everything here is batched: the views of B images are drawn at once, as one
(B, N, C, H, W) tensor, with per-view random parameters held in tensors, on the
images' device; no Python loop over views or images.

Why not Kornia's ``RandomResizedCrop``: these crops follow torchvision's (the
reference code's) rule with continuous boxes, and at the CIFAR size of the zoo's
CLIP pair they are faster (1600 x 3 x 32 x 32 with flips, 1 CPU thread: 51 ms
against Kornia's 114 ms; at 224 px equal, 1293 against 1238 ms for 512 images);
Kornia has no AugMix. TPT and RLCF take any crop module of one's own as
``transform=`` (a Kornia pipeline included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int

__all__ = [
    "augmented_copies",
    "check_view_shape",
    "random_resized_crops",
    "augmix",
    "make_views",
    "gather_views",
    "Views",
]


def _uniform(shape, lo: float, hi: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = like.device if generator is None else generator.device
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32).to(like.device)
    return lo + (hi - lo) * u


def _randint(high: int, shape, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return (_uniform(shape, 0.0, 1.0, like, generator) * high).long().clamp_(max=high - 1)


def _warp(x: Tensor, theta: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Sample ``x`` (N, C, H, W) through per-image affine maps ``theta`` (N, 2, 3)
    from output to input coordinates, normalised to [-1, 1]."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def random_resized_crops(
    x: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One random crop per image of ``x`` (N, C, H, W), resized back to H x W, then
    flipped horizontally with probability ``flip_p``: torchvision's
    ``RandomResizedCrop`` + ``RandomHorizontalFlip``, with continuous crop boxes.

    Like torchvision, a box of area ``scale`` x the image area and aspect ``ratio``
    (log-uniform) is tried 10 times; images where no try fits get the largest centred
    crop within ``ratio``."""
    n, _, h, w = x.shape
    tries = 10
    area = _uniform((n, tries), scale[0], scale[1], x, generator) * (h * w)
    log_r = _uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), x, generator)
    cw, ch = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
    fits = (cw <= w) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # Fallback: the whole image, cut to the nearest allowed aspect ratio.
    aspect = w / h
    fw, fh = (w, w / ratio[0]) if aspect < ratio[0] else (h * ratio[1], h) if aspect > ratio[1] else (w, h)
    found = fits.any(dim=1)
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    # A random offset for a box that fits; the fallback is centred (torchvision's).
    x0 = torch.where(found, _uniform(n, 0.0, 1.0, x, generator), 0.5) * (w - cw)
    y0 = torch.where(found, _uniform(n, 0.0, 1.0, x, generator), 0.5) * (h - ch)
    flip = torch.where(_uniform(n, 0.0, 1.0, x, generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = cw / w * flip
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    return _warp(x, theta, padding_mode="border")


# ----------------------------------------------------------------------------------
# AugMix (Hendrycks et al., ICLR 2020) as TPT uses it: severity 1, width 3, depth 1-3
# ----------------------------------------------------------------------------------

_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_COLOUR = ("autocontrast", "equalize", "posterize", "solarize")
AUGMIX_OPS = _GEOMETRIC + _COLOUR


def _equalize(q: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize`` per image and channel of 8-bit values ``q``
    (N, C, P) as float, through one batched histogram."""
    flat = q.long()
    hist = torch.zeros(*q.shape[:2], 256, device=q.device).scatter_add_(2, flat, torch.ones_like(q))
    last = hist.gather(2, flat.amax(dim=2, keepdim=True))  # count of the brightest value
    step = torch.div(q.shape[2] - last, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(2) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp_(max=255)
    return torch.where(step > 0, lut.gather(2, flat), q)


def _colour_ops(x: Tensor, level: Tensor) -> dict[str, Tensor]:
    """The four colour ops of AugMix on 8-bit quantised pixels, all images at once."""
    n, c, h, w = x.shape
    q = (x.float().clamp(0, 1) * 255).round()
    lo, hi = q.amin(dim=(2, 3), keepdim=True), q.amax(dim=(2, 3), keepdim=True)
    contrast = torch.where(hi > lo, ((q - lo) * 255 / (hi - lo).clamp_min(1)).floor(), q)
    equal = _equalize(q.reshape(n, c, h * w)).reshape(n, c, h, w)
    bits = 4 - (level * 4 / 10).floor()
    shift = (2 ** (8 - bits)).view(n, 1, 1, 1)
    poster = (q / shift).floor() * shift
    threshold = (256 - (level * 256 / 10).floor()).view(n, 1, 1, 1)
    solar = torch.where(q >= threshold, 255 - q, q)
    return {k: (v / 255).to(x.dtype) for k, v in
            zip(_COLOUR, (contrast, equal, poster, solar))}


def _geometric_theta(op: Tensor, level: Tensor, sign: Tensor, h: int, w: int) -> Tensor:
    """Affine maps (output -> input, normalised) of AugMix's geometric ops, PIL
    conventions (shears about the top-left corner, translations in pixels)."""
    n = op.shape[0]
    theta = torch.zeros(n, 2, 3, device=op.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    angle = torch.deg2rad((level * 30 / 10).floor() * sign)
    shear = level * 0.3 / 10 * sign
    shift = (level * (min(h, w) / 3) / 10).floor() * sign
    is_op = {name: op == AUGMIX_OPS.index(name) for name in _GEOMETRIC}
    rot = is_op["rotate"]
    theta[:, 0, 0] = torch.where(rot, angle.cos(), theta[:, 0, 0])
    theta[:, 1, 1] = torch.where(rot, angle.cos(), theta[:, 1, 1])
    theta[:, 0, 1] = torch.where(rot, -angle.sin() * h / w, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(rot, angle.sin() * w / h, theta[:, 1, 0])
    sx, sy = is_op["shear_x"], is_op["shear_y"]
    theta[:, 0, 1] = torch.where(sx, shear * h / w, theta[:, 0, 1])
    theta[:, 0, 2] = torch.where(sx, shear * h / w, theta[:, 0, 2])
    theta[:, 1, 0] = torch.where(sy, shear * w / h, theta[:, 1, 0])
    theta[:, 1, 2] = torch.where(sy, shear * w / h, theta[:, 1, 2])
    theta[:, 0, 2] = torch.where(is_op["translate_x"], 2 * shift / w, theta[:, 0, 2])
    theta[:, 1, 2] = torch.where(is_op["translate_y"], 2 * shift / h, theta[:, 1, 2])
    return theta


def augmix(
    x: Tensor, severity: float = 1.0, width: int = 3, max_depth: int = 3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """AugMix each image of ``x`` (N, C, H, W): ``width`` chains of 1 to
    ``max_depth`` random ops (rotate, shear, translate, autocontrast, equalize,
    posterize, solarize at ``severity``), mixed with Dirichlet(1) weights, then mixed
    with the image with a Beta(1, 1) weight. All chains advance together, one op per
    chain and step: one warp for the geometric ops, ``torch.where`` for the rest."""
    n, c, h, w = x.shape
    chains = x.unsqueeze(1).expand(n, width, c, h, w).reshape(n * width, c, h, w)
    depth = 1 + _randint(max_depth, n * width, x, generator)
    for step in range(max_depth):
        op = _randint(len(AUGMIX_OPS), n * width, x, generator)
        op = torch.where(step < depth, op, -1)  # chains shorter than this step rest
        level = _uniform(n * width, 0.1, max(severity, 0.1), x, generator)
        sign = torch.where(_uniform(n * width, 0.0, 1.0, x, generator) < 0.5, -1.0, 1.0)
        geometric = ((op >= 0) & (op < len(_GEOMETRIC))).view(-1, 1, 1, 1)
        out = torch.where(geometric, _warp(chains, _geometric_theta(op, level, sign, h, w)), chains)
        for name, value in _colour_ops(chains, level).items():
            out = torch.where((op == AUGMIX_OPS.index(name)).view(-1, 1, 1, 1), value, out)
        chains = out
    weights = -_uniform((n, width), 1e-6, 1.0, x, generator).log()  # Dirichlet(1, ..., 1)
    weights = (weights / weights.sum(dim=1, keepdim=True)).to(x.dtype)
    mix = (weights.view(n, width, 1, 1, 1) * chains.view(n, width, c, h, w)).sum(dim=1)
    m = _uniform(n, 0.0, 1.0, x, generator).to(x.dtype).view(n, 1, 1, 1)  # Beta(1, 1)
    return m * x + (1 - m) * mix


def check_view_shape(views: Tensor, images: Tensor, transform: nn.Module) -> Tensor:
    """``views``, the output of ``transform`` on ``images``, if it has their shape
    (views go through the model beside the images and are regrouped per image)."""
    if not isinstance(views, Tensor) or views.shape != images.shape:
        got = tuple(views.shape) if isinstance(views, Tensor) else type(views).__name__
        h, w = images.shape[-2:]
        raise ValueError(f"the view transform {type(transform).__name__} must keep the images' shape "
                         f"{tuple(images.shape)}, got {got}: crop then resize back, e.g. "
                         f"kornia.augmentation.RandomResizedCrop(({h}, {w}))")
    return views


def augmented_copies(
    x: Tensor,
    num_copies: int,
    *,
    use_augmix: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    transform: nn.Module | None = None,
) -> Tensor:
    """``num_copies`` augmented copies of each image of ``x`` (B, C, H, W) as (B,
    num_copies, C, H, W): random resized crops (flipped half the time), or what
    ``transform`` makes of the image (a module on (N, C, H, W) batches, e.g. a Kornia
    pipeline), AugMixed if ``use_augmix``. Independent per copy; one call of the
    transform for the whole batch, an image's copies contiguous."""
    check_positive_int(num_copies, "num_copies")
    b = x.shape[0]
    many = x.unsqueeze(1).expand(b, num_copies, *x.shape[1:]).reshape(-1, *x.shape[1:])
    crops = (check_view_shape(transform(many), many, transform) if transform is not None
             else random_resized_crops(many, scale=scale, flip_p=flip_p, generator=generator))
    if use_augmix:
        crops = augmix(crops, generator=generator)
    return crops.to(x.dtype).view(b, num_copies, *x.shape[1:])


def make_views(
    x: Tensor,
    num_views: int = 64,
    *,
    use_augmix: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    transform: nn.Module | None = None,
) -> Tensor:
    """``num_views`` views of each image of ``x`` (B, C, H, W) as (B, num_views, C,
    H, W): view 0 is the image itself, unchanged; the others its
    :func:`augmented_copies`."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    check_positive_int(num_views, "num_views")
    if num_views == 1:  # the image alone: no crops to draw (an empty batch of affine maps fails)
        return x.unsqueeze(1)
    copies = augmented_copies(x, num_views - 1, use_augmix=use_augmix, scale=scale, flip_p=flip_p,
                              generator=generator, transform=transform)
    return torch.cat([x.unsqueeze(1), copies], dim=1)


def gather_views(values: Tensor, index: Tensor) -> Tensor:
    """``values[b, index[b]]`` for every image b: (B, N, ...) and (B, k) -> (B, k, ...)."""
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1)
    return values[rows, index.to(values.device)]


class Views(nn.Module):
    """Module form of :func:`make_views`."""

    def __init__(self, num_views: int = 64, use_augmix: bool = False, scale: tuple[float, float] = (0.08, 1.0),
                 flip_p: float = 0.5, transform: nn.Module | None = None) -> None:
        super().__init__()
        self.num_views, self.use_augmix, self.scale, self.flip_p = num_views, use_augmix, scale, flip_p
        self.transform = transform

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return make_views(x, self.num_views, use_augmix=self.use_augmix, scale=self.scale,
                          flip_p=self.flip_p, generator=generator, transform=self.transform)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, use_augmix={self.use_augmix}, scale={self.scale}"
