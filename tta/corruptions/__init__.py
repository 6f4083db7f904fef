"""ImageNet-C corruptions (Hendrycks & Dietterich, 2019), batched in torch.

>>> from tta.corruptions import corrupt, Corrupt, NAMES
>>> g = torch.Generator().manual_seed(0)
>>> y = corrupt(x, "fog", 3, generator=g)       # x: (B, 3, H, W) float RGB in [0, 1]
>>> aug = Corrupt("motion_blur", 5)             # nn.Module, Kornia style
>>> y = aug(x)

Each corruption follows the definition and severity tables of the original code
(hendrycks/robustness: ``make_imagenet_c.py`` / the ``imagenet_c`` package for
``preset="imagenet"``, ``make_tinyimagenet_c.py`` for ``"tinyimagenet"``,
``make_cifar_c.py`` for ``"cifar"``), including its quirks (the glass-blur "swap"
that copies, the 244-for-224 elastic constants, frost never picking texture 6).
Everything runs on the images' device, vectorised over the batch.

Randomness comes from ``generator`` (drawn on the generator's device, then moved),
so a seeded generator reproduces a result on any device. A list of generators, one
per image, makes each image's corruption depend on its own generator alone (not on
its batch): what a benchmark needs for the same corrupted image in every stream order. Results are computed in
float32 (float64 stays float64; half precision is upcast and cast back) and, with
``quantize=True`` (default), snapped to 8-bit levels the way the original's uint8
output is: truncation (``np.uint8``) for float results, rounding where the
original's result comes from Pillow's 8-bit resize or JPEG codec.
"""

from __future__ import annotations

import difflib
import numbers
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from . import _blur, _digital, _noise, _weather
from ._common import Context, Rng, new_batch, quantize_floor_into, quantize_round_into
from ._frost import FROST_FILES, FROST_SHA256, default_frost_dir, load_frost_textures, set_frost_dir
from ._tables import PRESET_SIZES, PRESETS, TABLES

__all__ = [
    "NAMES",
    "EXTRA_NAMES",
    "ALL_NAMES",
    "PRESETS",
    "Corrupt",
    "corrupt",
    "choose_preset",
    "default_frost_dir",
    "set_frost_dir",
    "load_frost_textures",
    "FROST_FILES",
    "FROST_SHA256",
]

#: The 15 benchmark corruptions, in ImageNet-C order.
NAMES: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The 4 held-out validation corruptions.
EXTRA_NAMES: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_NAMES: tuple[str, ...] = NAMES + EXTRA_NAMES

class _Spec(NamedTuple):
    """How a corruption is made. ``draws(x, c, ctx)`` makes every random draw for
    the whole batch, in the original's order (a tuple of tensors led by the batch;
    ``None``: deterministic); ``render(x, c, ctx, *draws)`` turns images and their
    draws into a new tensor. ``qmode``: how the original's result becomes uint8.
    ``nchw``: the render wants contiguous NCHW images (else it takes them in any
    layout: JPEG, whose codec works on channels-last pixels). The output takes the
    renders' layout."""

    draws: Callable[..., tuple[Tensor, ...]] | None
    render: Callable[..., Tensor]
    qmode: str
    nchw: bool = True


_REGISTRY: dict[str, _Spec] = {
    "gaussian_noise": _Spec(_noise.gaussian_noise_draws, _noise.gaussian_noise, "floor"),
    "shot_noise": _Spec(_noise.shot_noise_draws, _noise.shot_noise, "floor"),
    "impulse_noise": _Spec(_noise.impulse_noise_draws, _noise.impulse_noise, "floor"),
    "speckle_noise": _Spec(_noise.speckle_noise_draws, _noise.speckle_noise, "floor"),
    "defocus_blur": _Spec(None, _blur.defocus_blur, "floor"),
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
    "elastic_transform": _Spec(_digital.elastic_transform_draws, _digital.elastic_transform, "floor"),
    "pixelate": _Spec(None, _digital.pixelate, "round"),
    "jpeg_compression": _Spec(None, _digital.jpeg_compression, "round", nchw=False),
}

# Images per rendering chunk on the CPU: about this many values (4 MB of float32).
# Rendering a whole batch makes every intermediate a fresh tens-of-MB allocation,
# which glibc maps from the kernel page by page (64 x 224 px: 0.3 ms per image per
# temporary, more than most corruption steps cost in cache); chunks this size are
# served from the heap and stay in cache. Accelerators render the batch at once.
_CPU_CHUNK_VALUES = 1 << 19


def choose_preset(height: int, width: int) -> str:
    """The preset whose tables suit this image size: longest side <= 32 ->
    ``"cifar"``, <= 64 -> ``"tinyimagenet"``, larger -> ``"imagenet"``."""
    size = max(height, width)
    if size <= PRESET_SIZES["cifar"]:
        return "cifar"
    if size <= PRESET_SIZES["tinyimagenet"]:
        return "tinyimagenet"
    return "imagenet"


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"corruption name must be a str, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _REGISTRY:
        return key
    close = difflib.get_close_matches(key, ALL_NAMES, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown corruption {name!r}{hint} (choose from {', '.join(ALL_NAMES)})")


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral):
        raise TypeError(f"severity must be an int in 1..5, got {severity!r}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    return int(severity)


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"images must be floating point RGB in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    # over channels-last images aminmax would first copy them to NCHW (20x slower)
    flat = x.detach().permute(0, 2, 3, 1) if _channels_last(x) else x.detach()
    lo, hi = torch.aminmax(flat)
    if not (bool(lo >= 0) and bool(hi <= 1)):
        raise ValueError(
            f"images must lie in [0, 1] (got min {float(lo):.4g}, max {float(hi):.4g}); "
            "corruptions take unnormalised RGB"
        )


def corrupt(
    x: Tensor,
    name: str,
    severity: int,
    *,
    preset: str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    quantize: bool = True,
    frost_dir: str | os.PathLike | None = None,
) -> Tensor:
    """Apply ImageNet-C corruption ``name`` at ``severity`` to a batch of images.

    Args:
        x: float RGB images in [0, 1], shape ``(B, 3, H, W)``, any device.
        name: one of :data:`NAMES` or :data:`EXTRA_NAMES`.
        severity: 1 (mild) to 5 (strongest).
        preset: severity tables to use: ``"imagenet"`` (made for 224 px),
            ``"tinyimagenet"`` (64 px) or ``"cifar"`` (32 px); ``None`` picks by
            image size (see :func:`choose_preset`).
        generator: source of randomness; the same seed gives the same output. A
            sequence of ``B`` generators (one per image, all on one device) gives
            image ``i`` the corruption its generator ``i`` alone decides.
        quantize: snap the result to 8-bit levels like the original's uint8 output.
        frost_dir: folder with the frost textures (default: :func:`set_frost_dir`,
            else ``$TTA_FROST_DIR``, else ``$TTA_HOME/data/imagenet-c-frost``);
            missing textures are downloaded there once, sha256-checked.

    Returns:
        The corrupted images: same shape, dtype and device as ``x``, in [0, 1].
    """
    key = _check_name(name)
    severity = _check_severity(severity)
    _check_images(x)
    if preset is None:
        preset = choose_preset(x.shape[-2], x.shape[-1])
    elif preset not in TABLES:
        close = difflib.get_close_matches(str(preset), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {preset!r}{hint} (choose from {', '.join(PRESETS)})")
    _check_generator(generator, x.shape[0])
    if x.shape[0] == 0:
        return x.clone()
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rng = Rng(generator, x.device, work_dtype)
    return _apply(x, key, severity, preset, rng, quantize, frost_dir)


def _check_generator(generator: object, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(
            "generator must be a torch.Generator or a list of them (one per image), got "
            f"{type(generator).__name__}"
        )
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch} images: give one per image")
    devices = {g.device for g in generator}
    if len(devices) > 1:
        raise ValueError(f"the per-image generators live on several devices {sorted(map(str, devices))}: use one")


def _apply(
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
    spec = _REGISTRY[key]
    table = TABLES[preset]
    ctx = Context(
        rng=rng,
        preset=preset,
        table=table,
        quantize=quantize,
        frost_dir=Path(frost_dir) if frost_dir is not None else None,
    )
    c = table[key][severity - 1]
    with torch.no_grad():
        x = x.detach()
        drawn = spec.draws(x, c, ctx) if spec.draws is not None else ()
        out = _reusable_draw(x, drawn)
        step = _chunk_images(x)
        for i in range(0, x.shape[0], step):
            part = x[i : i + step]
            y = spec.render(_render_input(part, spec, ctx), c, ctx, *(d[i : i + step] for d in drawn))
            if out is None:  # in the renders' own layout: no transposing copy
                layout = torch.channels_last if _channels_last(y) else torch.contiguous_format
                out = new_batch(tuple(x.shape), x.dtype, x.device, layout)
            _finish(y, part, out[i : i + step], quantize, spec.qmode)
    return out


def _render_input(part: Tensor, spec: _Spec, ctx: Context) -> Tensor:
    """A chunk of images as its render takes it: the work dtype, contiguous NCHW
    unless the render takes any layout; converted into a buffer kept for the
    chunks (see ``Context.buffer``)."""
    dtype = ctx.rng.dtype
    if part.dtype == dtype and (part.is_contiguous() or not spec.nchw):
        return part
    if not spec.nchw:
        return part.to(dtype)
    return ctx.buffer("images", tuple(part.shape), dtype, part.device).copy_(part)


def _reusable_draw(x: Tensor, drawn: tuple[Tensor, ...]) -> Tensor | None:
    """The first draw when it can hold the results (the noises render into their
    own draws, chunk by chunk, once read): a batch-sized tensor costs its page
    faults (see ``new_batch``), one per corruption is enough."""
    if drawn and drawn[0].shape == x.shape and drawn[0].dtype == x.dtype and drawn[0].is_contiguous():
        return drawn[0]
    return None


def _channels_last(x: Tensor) -> bool:
    # tta.data's loaders (and models run channels-last) give such images
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _chunk_images(x: Tensor) -> int:
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, _CPU_CHUNK_VALUES // max(1, x[0].numel()))


def _finish(y: Tensor, x: Tensor, dest: Tensor, quantize: bool, qmode: str) -> None:
    """Write ``y`` (the render of images ``x``) to ``dest`` as 8-bit levels in
    [0, 1], in ``dest``'s dtype. ``y`` is the render's own tensor: quantised in
    place. Renders whose result is 8-bit whatever ``quantize`` says (Pillow's
    resize, the JPEG codec) may return it as uint8 levels, which only need the
    division."""
    if y.dtype == torch.uint8:
        torch.div(y, 255, out=dest)
        return
    if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        y = y.clone()  # a render that passed its input through: never write to the caller's images
    if quantize:
        quantize_floor_into(y, dest) if qmode == "floor" else quantize_round_into(y, dest)
    else:
        torch.clamp(y, 0, 1, out=dest)


class Corrupt(nn.Module):
    """Kornia-style module applying :func:`corrupt` with fixed settings.

    >>> aug = Corrupt("snow", 3, generator=torch.Generator().manual_seed(0))
    >>> y = aug(x)
    """

    def __init__(
        self,
        name: str,
        severity: int,
        preset: str | None = None,
        *,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        quantize: bool = True,
        frost_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.name = _check_name(name)
        self.severity = _check_severity(severity)
        if preset is not None and preset not in TABLES:
            raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        self.preset = preset
        self.generator = generator
        self.quantize = quantize
        self.frost_dir = frost_dir

    def forward(self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """Corrupt ``x``; ``generator`` (if given; one, or one per image) overrides
        the one set at construction."""
        return corrupt(
            x,
            self.name,
            self.severity,
            preset=self.preset,
            generator=generator if generator is not None else self.generator,
            quantize=self.quantize,
            frost_dir=self.frost_dir,
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, severity={self.severity}, preset={self.preset!r}, quantize={self.quantize}"
