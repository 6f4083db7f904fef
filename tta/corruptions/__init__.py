"""ImageNet-C corruptions (Hendrycks & Dietterich, 2019), batched in torch.

>>> from tta.corruptions import corrupt, Corrupt, NAMES
>>> g = torch.Generator().manual_seed(0)
>>> y = corrupt(x, "fog", 3, generator=g)       # x: (B, 3, H, W) float RGB in [0, 1] (or uint8)
>>> aug = Corrupt("motion_blur", 5)             # nn.Module, Kornia style
>>> y = aug(x)

Each corruption follows the definition and severity tables of the original code
(hendrycks/robustness: ``make_imagenet_c.py`` / the ``imagenet_c`` package for
``preset="imagenet"``, ``make_tinyimagenet_c.py`` for ``"tinyimagenet"``,
``make_cifar_c.py`` for ``"cifar"``), including its quirks (the glass-blur "swap"
that copies, the 244-for-224 elastic constants, frost never picking texture 6).
Everything runs on the images' device, vectorised over the batch. A corruption
makes all its random draws for the whole batch first, then renders the images: at
once on accelerators, in cache-sized chunks on the CPU (1.5x faster at 224 px;
the cut never changes a result), where the process's malloc is also set to keep
freed memory (``tta/_host_memory.py``; ``TTA_HOST_ALLOCATOR=default`` opts out).

Randomness comes from ``generator`` (drawn on the generator's device, then moved),
so a seeded generator reproduces a result on any device. A list of generators, one
per image, makes each image's corruption depend on its own generator alone (not on
its batch): what a benchmark needs for the same corrupted image in every stream order. Results are computed in
float32 (float64 stays float64; half precision is upcast and cast back) and, with
``quantize=True`` (default), snapped to 8-bit levels the way the original's uint8
output is: truncation (``np.uint8``) for float results, rounding where the
original's result comes from Pillow's 8-bit resize or JPEG codec. uint8 images
(what image decoders give) come back as uint8, the same levels as for
``x.float() / 255``: each chunk is converted while in cache, and no float batch is
read or written (the JPEG codec takes the bytes as they are).
"""

from __future__ import annotations

import difflib
import numbers
import os
from typing import Sequence

import torch
from torch import Tensor, nn

from .._host_memory import keep_freed_host_memory
from .._warn import warn_at_caller
from ._common import Rng, channels_last
from ._frost import FROST_FILES, FROST_SHA256, default_frost_dir, load_frost_textures, set_frost_dir
from ._render import REGISTRY as _REGISTRY
from ._render import apply as _apply
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
    # a part of a name ("jpeg", "elastic") is as good a hint as a misspelling
    close = [n for n in ALL_NAMES if key and key in n] or difflib.get_close_matches(key, ALL_NAMES, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close[:3])}?" if close else ""
    raise ValueError(f"unknown corruption {name!r}{hint} (choose from {', '.join(ALL_NAMES)})")


def _check_preset(preset: str | None) -> str | None:
    if preset is None or preset in TABLES:
        return preset
    close = difflib.get_close_matches(str(preset), PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown preset {preset!r}{hint} (choose from {', '.join(PRESETS)})")


def _check_quantize(quantize: bool) -> bool:
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be True or False, got {quantize!r}")
    return quantize


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
        raise ValueError(f"images must have shape (B, 3, H, W) or (3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point() and x.dtype != torch.uint8:
        raise TypeError(f"images must be floating point RGB in [0, 1] or uint8 RGB, got dtype {x.dtype}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"images must be at least 1x1 pixels, got shape {tuple(x.shape)}")
    if x.numel() == 0 or x.dtype == torch.uint8:  # every uint8 value is a level
        return
    # over channels-last images aminmax would first copy them to NCHW (20x slower)
    flat = x.detach().permute(0, 2, 3, 1) if channels_last(x) else x.detach()
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
        x: float RGB images in [0, 1], or uint8 RGB images (0-255), shape ``(B, 3,
            H, W)``, or one image ``(3, H, W)`` (as a dataset's transform sees it),
            any device.
        name: one of :data:`NAMES` or :data:`EXTRA_NAMES`.
        severity: 1 (mild) to 5 (strongest).
        preset: severity tables to use: ``"imagenet"`` (made for 224 px),
            ``"tinyimagenet"`` (64 px) or ``"cifar"`` (32 px); ``None`` picks by
            image size (see :func:`choose_preset`).
        generator: source of randomness; the same seed gives the same output. A
            sequence of ``B`` generators (one per image, all on one device) gives
            image ``i`` the corruption its generator ``i`` alone decides.
        quantize: snap the result to 8-bit levels like the original's uint8 output
            (uint8 images always are: ``quantize=False`` is refused for them).
        frost_dir: folder with the frost textures (default: :func:`set_frost_dir`,
            else ``$TTA_FROST_DIR``, else ``$TTA_HOME/data/imagenet-c-frost``);
            missing textures are downloaded there once, sha256-checked.

    Returns:
        The corrupted images: same shape, dtype and device as ``x`` (in [0, 1] for
        float images; for uint8 ones, the levels of ``corrupt(x.float() / 255, ...)``
        times 255).
    """
    key = _check_name(name)
    severity = _check_severity(severity)
    if isinstance(x, Tensor) and x.dim() == 3 and x.shape[0] == 3:  # one image: a batch of one
        return corrupt(x[None], key, severity, preset=preset, generator=generator, quantize=quantize,
                       frost_dir=frost_dir)[0]
    _check_images(x)
    if not _check_quantize(quantize) and x.dtype == torch.uint8:
        raise ValueError("quantize=False keeps results between the 8-bit levels, which uint8 images cannot "
                         "hold: give float images (x.float() / 255) for that, or leave quantize=True")
    if _check_preset(preset) is None:
        preset = choose_preset(x.shape[-2], x.shape[-1])
    _check_generator(generator, x.shape[0])
    if x.shape[0] == 0:
        return x.clone()
    if x.device.type == "cpu":
        # batch-sized outputs and draws, and each chunk's temporaries, come back from
        # the kernel page by page unless freed memory is kept (tta/_host_memory.py):
        # 0.1-0.3 ms per 224 px image and tensor, as much as a cheap corruption
        keep_freed_host_memory()
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # uint8 too: float32
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


class Corrupt(nn.Module):
    """Kornia-style module applying :func:`corrupt` with fixed settings, to batches
    or to single ``(3, H, W)`` images (a dataset transform).

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
        self.preset = _check_preset(preset)
        self.generator = generator
        self.quantize = _check_quantize(quantize)
        self.frost_dir = frost_dir
        # the generator and its seed as built, to tell a DataLoader worker's copy of
        # it that nobody re-seeded (see _warn_if_worker_copy)
        self._built = (generator, generator.initial_seed()) if isinstance(generator, torch.Generator) else None
        self._warned_in: int | None = None

    def forward(self, x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """Corrupt ``x``; ``generator`` (if given; one, or one per image) overrides
        the one set at construction."""
        if generator is None:
            self._warn_if_worker_copy()
        return corrupt(
            x,
            self.name,
            self.severity,
            preset=self.preset,
            generator=generator if generator is not None else self.generator,
            quantize=self.quantize,
            frost_dir=self.frost_dir,
        )

    def _warn_if_worker_copy(self) -> None:
        """Warn (once per process) when this transform runs in one of several
        DataLoader workers with the generator it was built with, never re-seeded:
        every worker holds a copy of that generator in the same state, so the
        workers' images get the same noise, draw for draw."""
        built = getattr(self, "_built", None)
        if built is None or self.generator is not built[0] or self.generator.initial_seed() != built[1]:
            return
        if _REGISTRY[self.name].draws is None:  # brightness, pixelate ...: nothing drawn
            return
        info = torch.utils.data.get_worker_info()
        # Worker 0 is left out: re-seeded as usual (seed + worker id) it keeps the seed
        # it was built with; worker 1 of an unseeded copy says it for all.
        if info is None or info.id == 0 or self._warned_in == os.getpid():
            return
        self._warned_in = os.getpid()
        warn_at_caller(
            f"Corrupt({self.name!r}) runs in DataLoader worker {info.id} of {info.num_workers} with the "
            "generator it was built with: each worker holds a copy of it in the same state, so the workers "
            "corrupt their images with the same random draws. Leave generator=None (DataLoader seeds "
            "torch's generator per worker), or re-seed it per worker in worker_init_fn"
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, severity={self.severity}, preset={self.preset!r}, quantize={self.quantize}"
