"""Noise corruptions: Gaussian, shot (Poisson), impulse (salt & pepper), speckle."""

from __future__ import annotations

from torch import Tensor

from ._common import Context


def gaussian_noise(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Additive N(0, c^2) noise per pixel and channel."""
    return (x + ctx.rng.normal(tuple(x.shape), 0.0, c)).clamp_(0, 1)


def shot_noise(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Poisson photon counts with ``c`` photons at full intensity."""
    return (ctx.rng.poisson(x * c) / c).clamp_(0, 1)


def impulse_noise(x: Tensor, c: float, ctx: Context) -> Tensor:
    """``skimage.util.random_noise(mode='s&p', amount=c)``: every value (each channel
    on its own) is hit with probability ``c``; a hit is salt or pepper with equal odds."""
    # one uniform per value decides both: u < c/2 salt, c/2 <= u < c pepper
    u = ctx.rng.uniform(tuple(x.shape))
    out = x.masked_fill(u < c, 0.0)
    return out.masked_fill_(u < c / 2, 1.0)


def speckle_noise(x: Tensor, c: float, ctx: Context) -> Tensor:
    """Multiplicative noise ``x + x * N(0, c^2)``."""
    return (x + x * ctx.rng.normal(tuple(x.shape), 0.0, c)).clamp_(0, 1)
