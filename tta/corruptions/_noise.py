"""Noise corruptions: Gaussian, shot (Poisson), impulse (salt & pepper), speckle.

Each has its draws (``*_draws``, the whole batch at once) and its rendering (on the
images and their share of the draws); see ``REGISTRY`` in ``_render``. The
renderings write into their draws, which then become the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Context

# Shot noise with at most this many photons at full intensity is sampled by
# inverting the Poisson CDF (one uniform per value; see `_poisson_by_inversion`).
_INVERSION_MAX_PHOTONS = 12


def gaussian_noise_draws(x: Tensor, c: float, ctx: Context) -> tuple[Tensor]:
    return (ctx.rng.normal(tuple(x.shape), 0.0, c),)


def gaussian_noise(x: Tensor, c: float, ctx: Context, noise: Tensor) -> Tensor:
    """Additive N(0, c^2) noise per pixel and channel."""
    return noise.add_(x)


def shot_noise_draws(x: Tensor, c: float, ctx: Context) -> tuple[Tensor]:
    if c <= _INVERSION_MAX_PHOTONS:
        return (ctx.rng.uniform(tuple(x.shape)),)
    # many photons: torch's sampler (its transformed rejection beats a long
    # inversion); the counts depend on the images, drawn whole like every draw
    levels = x.to(ctx.rng.dtype).div_(255) if x.dtype == torch.uint8 else x.to(ctx.rng.dtype)
    return (ctx.rng.poisson(levels * c),)


def shot_noise(x: Tensor, c: float, ctx: Context, drawn: Tensor) -> Tensor:
    """Poisson photon counts with ``c`` photons at full intensity."""
    if c > _INVERSION_MAX_PHOTONS:
        return drawn.div_(c)
    # Every count from c photons on gives white (the result is clipped to [0, 1],
    # quantised or not): no need to tell them apart. Uncapped, a uniform within
    # float32 rounding of 1 could stay above every float32 partial sum: no end.
    return torch.div(_poisson_by_inversion(x, c, drawn, int(-(-c // 1)), ctx), c, out=drawn)


def _poisson_by_inversion(x: Tensor, c: float, u: Tensor, cap: int, ctx: Context) -> Tensor:
    """Poisson(``rates`` = ``x * c``) counts from uniforms ``u`` (overwritten) by
    inverting the CDF, capped at ``cap``: the count is the number of partial sums
    ``sum_{i<=k} rates^i / i!``, ``k < cap``, below ``u * e^rates`` (the CDF
    without its ``e^-rates``).

    An exact sampler (float32 sums) below the cap, and 3x faster than
    ``torch.poisson`` at ImageNet-C's few photons (3-12 at severities 3-5, one
    thread, 224 px): that one draws about ``rates + 1`` uniforms per value one at a
    time, this one a single uniform each and compares whole tensors, once per count
    value (so few photons only: ``_INVERSION_MAX_PHOTONS``). The counts differ draw
    by draw from ``torch.poisson``'s (another use of the random stream), their law
    does not.
    """
    shape, dev = tuple(x.shape), x.device
    rates = torch.mul(x, c, out=ctx.buffer("rates", shape, x.dtype, dev))
    partial = torch.exp(rates, out=ctx.buffer("partial", shape, x.dtype, dev))
    u.mul_(partial)  # u e^rates, in place: the caller's scratch
    # Counts in bytes: 10x cheaper to add comparisons to than floats (they stay
    # below 256 at these rates).
    count = torch.gt(u, 1, out=ctx.buffer("count", shape, torch.bool, dev)).view(torch.uint8)  # k = 0: sum 1
    torch.add(rates, 1, out=partial)
    above = ctx.buffer("above", shape, torch.bool, dev)
    term = ctx.buffer("term", shape, x.dtype, dev)
    for k in range(1, cap):
        count += torch.gt(u, partial, out=above)
        if k + 1 < cap:
            torch.mul(rates, rates, out=term) if k == 1 else term.mul_(rates)
            partial += term.div_(k + 1)
    return count


def impulse_noise_draws(x: Tensor, c: float, ctx: Context) -> tuple[Tensor]:
    # one uniform per value decides both: u < c/2 salt, c/2 <= u < c pepper
    return (ctx.rng.uniform(tuple(x.shape)),)


def impulse_noise(x: Tensor, c: float, ctx: Context, u: Tensor) -> Tensor:
    """``skimage.util.random_noise(mode='s&p', amount=c)``: every value (each channel
    on its own) is hit with probability ``c``; a hit is salt or pepper with equal odds."""
    # 1 where u >= c, 0 below; 1 where u < c/2, 0 from it on: the sign of a float
    # difference is exact, and float sign/clamp run 4x faster than comparisons
    # (bool tensors) on the CPU
    shape, dev = tuple(x.shape), x.device
    keep = torch.sub(u, c, out=ctx.buffer("keep", shape, x.dtype, dev)).sign_().add_(1).clamp_(0, 1)
    salt = torch.sub(u, c / 2, out=ctx.buffer("salt", shape, x.dtype, dev)).sign_().neg_().clamp_(0, 1)
    # exact: x * 1 + 0 and x * 0 + 1 or 0
    return torch.mul(x, keep, out=u).add_(salt)


def speckle_noise_draws(x: Tensor, c: float, ctx: Context) -> tuple[Tensor]:
    return (ctx.rng.normal(tuple(x.shape), 0.0, c),)


def speckle_noise(x: Tensor, c: float, ctx: Context, noise: Tensor) -> Tensor:
    """Multiplicative noise ``x + x * N(0, c^2)``."""
    return noise.mul_(x).add_(x)
