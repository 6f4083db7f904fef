"""How a validated request is rendered: every draw for the whole batch, then the
images chunk by chunk on the CPU (all at once elsewhere), each chunk's result
quantised into the output."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import _blur, _digital, _jpeg, _noise, _weather
from ._common import Context, Rng, channels_last, quantize_into
from ._tables import TABLES


class _Spec(NamedTuple):
    """How a corruption is made. ``draws(x, c, ctx)`` makes every random draw for
    the whole batch (``x`` as the caller gave it: floats, or uint8 levels), in the
    original's order (a tuple of tensors led by the batch; ``None``:
    deterministic); ``render(x, c, ctx, *draws)`` turns images and their draws into
    a new tensor. ``qmode``: how the original's result becomes uint8. ``nchw``: the
    render wants contiguous NCHW images (else it takes them in any layout: JPEG,
    whose codec works on channels-last pixels, and on the CPU takes uint8 images as
    they are). ``wide``: the render's intermediates are several times its images
    (FFT spectra, sampling grids), so it renders chunks of half the values. The
    output takes the renders' layout."""

    draws: Callable[..., tuple[Tensor, ...]] | None
    render: Callable[..., Tensor]
    qmode: str
    nchw: bool = True
    wide: bool = False


REGISTRY: dict[str, _Spec] = {
    "gaussian_noise": _Spec(_noise.gaussian_noise_draws, _noise.gaussian_noise, "floor"),
    "shot_noise": _Spec(_noise.shot_noise_draws, _noise.shot_noise, "floor"),
    "impulse_noise": _Spec(_noise.impulse_noise_draws, _noise.impulse_noise, "floor"),
    "speckle_noise": _Spec(_noise.speckle_noise_draws, _noise.speckle_noise, "floor"),
    "defocus_blur": _Spec(None, _blur.defocus_blur, "floor", wide=True),
    "glass_blur": _Spec(_blur.glass_blur_draws, _blur.glass_blur, "floor"),
    "motion_blur": _Spec(_blur.motion_blur_draws, _blur.motion_blur, "floor"),
    "zoom_blur": _Spec(None, _blur.zoom_blur, "floor"),
    "gaussian_blur": _Spec(None, _blur.gaussian_blur, "floor"),
    "snow": _Spec(_weather.snow_draws, _weather.snow, "floor"),
    "frost": _Spec(_weather.frost_draws, _weather.frost, "floor"),
    "fog": _Spec(_weather.fog_draws, _weather.fog, "floor"),
    "spatter": _Spec(_weather.spatter_draws, _weather.spatter, "floor"),
    "brightness": _Spec(None, _digital.brightness, "floor"),
    "contrast": _Spec(None, _digital.contrast, "floor"),
    "saturate": _Spec(None, _digital.saturate, "floor"),
    "elastic_transform": _Spec(_digital.elastic_transform_draws, _digital.elastic_transform, "floor", wide=True),
    "pixelate": _Spec(None, _digital.pixelate, "round"),
    "jpeg_compression": _Spec(None, _jpeg.jpeg_compression, "round", nchw=False),
}

# Images per rendering chunk on the CPU: about this many values (2 MB of float32, 3
# images at 224 px), whose steps run in cache: the 15 corruptions at 224 px took
# 19 ms per image so against 29 rendering a batch of 64 at once (38 MB a tensor),
# best of 2^18-2^21 values (one thread; rechecked 2026-12-07: 18.1 ms against 19.2,
# 21.5 and 22.0 at 2^18, 2^20 and 1.5 x 2^20). Wide renders take half, one 224-px
# image a chunk: defocus 0.89-0.96x and elastic 0.88-1.00x the time (three runs),
# where zoom blur and snow were 1.04x slower. Accelerators render the batch at once.
_CPU_CHUNK_VALUES = 1 << 19


def apply(
    x: Tensor,
    key: str,
    severity: int,
    preset: str,
    rng: Rng,
    quantize: bool,
    frost_dir: str | os.PathLike | None,
) -> Tensor:
    """Run a validated request with a given random stream (tests pass one that
    replays NumPy's draws to compare with the original draw for draw).

    All draws are made first, for the whole batch (so results do not depend on
    how the batch is cut), then the images are rendered chunk by chunk."""
    spec = REGISTRY[key]
    table = TABLES[preset]
    ctx = Context(
        rng=rng,
        preset=preset,
        table=table,
        quantize=quantize,
        frost_dir=Path(frost_dir) if frost_dir is not None else None,
    )
    c = table[key][severity - 1]
    # Under a caller's autocast (a model's amp), resampling, convolutions and the
    # codec's matrix products would run in half precision: not the original's maths.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.detach()
        drawn = spec.draws(x, c, ctx) if spec.draws is not None else ()
        out = _reusable_draw(x, drawn)
        step = _chunk_images(x, spec.wide)
        for i in range(0, x.shape[0], step):
            part = x[i : i + step]
            y = spec.render(_render_input(part, spec, ctx), c, ctx, *(d[i : i + step] for d in drawn))
            if out is None:  # in the renders' own layout: no transposing copy
                layout = torch.channels_last if channels_last(y) else torch.contiguous_format
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=layout)
            _finish(y, part, out[i : i + step], quantize, spec.qmode)
    return out


def _render_input(part: Tensor, spec: _Spec, ctx: Context) -> Tensor:
    """A chunk of images as its render takes it: the work dtype, contiguous NCHW
    unless the render takes any layout; converted into a buffer kept for the
    chunks (see ``Context.buffer``). uint8 levels become ``level / 255``, what
    ``x.float() / 255`` gives, but for the JPEG codec on the CPU, which reads them."""
    dtype = ctx.rng.dtype
    if part.dtype == torch.uint8:
        if not spec.nchw and part.device.type == "cpu":
            return part
        return ctx.buffer("images", tuple(part.shape), dtype, part.device).copy_(part).div_(255)
    if part.dtype == dtype and (part.is_contiguous() or not spec.nchw):
        return part
    if not spec.nchw:
        return part.to(dtype)
    return ctx.buffer("images", tuple(part.shape), dtype, part.device).copy_(part)


def _reusable_draw(x: Tensor, drawn: tuple[Tensor, ...]) -> Tensor | None:
    """The first draw when it can hold the results (the noises render into their
    own draws, chunk by chunk, once read): one batch-sized tensor less."""
    if drawn and drawn[0].shape == x.shape and drawn[0].dtype == x.dtype and drawn[0].is_contiguous():
        return drawn[0]
    return None


def _chunk_images(x: Tensor, wide: bool) -> int:
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, (_CPU_CHUNK_VALUES // (2 if wide else 1)) // max(1, x[0].numel()))


def _finish(y: Tensor, x: Tensor, dest: Tensor, quantize: bool, qmode: str) -> None:
    """Write ``y`` (the render of images ``x``) to ``dest`` as 8-bit levels in
    [0, 1], in ``dest``'s dtype. ``y`` is the render's own tensor: quantised in
    place. Renders whose result is 8-bit whatever ``quantize`` says (Pillow's
    resize, the JPEG codec) may return it as uint8 levels, which only need the
    division (none for a uint8 ``dest``, which ``quantize`` is True for)."""
    if y.dtype == torch.uint8:
        if dest.dtype == torch.uint8:
            dest.copy_(y)
        else:
            torch.div(y, 255, out=dest)
        return
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        y = y.clone()  # a render that passed its input through: never write to the caller's images
    if quantize:
        quantize_into(y, dest, qmode)
    else:
        torch.clamp(y, 0, 1, out=dest)
