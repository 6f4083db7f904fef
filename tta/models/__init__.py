"""The model registry: ``load_model(name)`` returns a classifier taking float RGB in
[0, 1] (normalisation inside), ready to wrap with :func:`tta.wrap`.

Names: the registered ones (``list_models()``), plus ``"timm:<any timm model>"`` and
``"clip:<open_clip model>/<pretrained tag or checkpoint path>"`` (zero-shot CLIP
classifiers, see :mod:`tta.models.clip`) and ``"zoo:<name>"`` (tta's offline model
zoo, see :mod:`tta.models.zoo`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._registry import Registry
from ..paths import download, sha256_of, tta_home
from .cifar_resnet import CifarResNet
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

__all__ = [
    "ImageClassifier",
    "CifarResNet",
    "register_model",
    "list_models",
    "load_model",
    "load_checkpoint",
]

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable:
    """Decorator registering a model factory ``fn(weights=None, **kw) -> nn.Module``."""
    return _MODELS.register(name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern (``timm:<name>`` also
    works for every timm model, see ``timm.list_models``). Zoo models are listed by
    a pattern starting with ``zoo:`` (``list_models("zoo:*")``)."""
    if pattern.startswith("zoo:"):
        from .zoo import list_zoo

        return [f"zoo:{n}" for n in list_zoo(pattern[len("zoo:"):])]
    return _MODELS.names(pattern)


def load_model(name: str, *, weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` in eval mode.

    Args:
        name: a registered name (``"cifar10_resnet20"``), ``"timm:<model>"``,
            ``"clip:<model>/<pretrained>"`` or ``"zoo:<name>"``.
        weights: a local checkpoint to load instead of the default weights.
        **kwargs: passed to the factory (``pretrained`` and ``num_classes`` for timm;
            ``classnames``, ``templates``, ``ctx_init`` for clip, see
            :func:`tta.models.clip.clip_classifier`); ``verify`` for zoo and
            ``clip:zoo/<name>`` (see :func:`tta.models.zoo.load_zoo_model`).
    """
    if name.startswith("timm:"):
        from .timm_models import timm_classifier

        model = timm_classifier(name[len("timm:"):], weights=weights, **kwargs)
    elif name.startswith("clip:"):
        from .clip import clip_classifier

        model = clip_classifier(name[len("clip:"):], weights=weights, **kwargs)
    elif name.startswith("zoo:"):
        from .zoo import load_zoo_model

        model = load_zoo_model(name[len("zoo:"):], weights=weights, **kwargs)
    else:
        model = _MODELS.get(name)(weights=weights, **kwargs)
    return model.eval()


#: What :func:`load_checkpoint` reads, for error messages.
VALID_CHECKPOINT = (
    "a valid checkpoint is a file written by torch.save holding a state dict of tensors "
    "(bare, or under 'state_dict', 'model' or 'state'), or a .safetensors file"
)


def checkpoint_format(path: str | os.PathLike) -> str | None:
    """What the first bytes of ``path`` say it is: ``"zip"`` (torch.save's format, also
    .npz), ``"pickle"`` (torch.save's legacy format), ``"safetensors"``, ``"numpy"``
    (.npy), or ``None`` for none of these (a text file, an image, a truncated file)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return None


def _checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` when it is an existing file; a ``FileNotFoundError`` or
    ``IsADirectoryError`` naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file; {VALID_CHECKPOINT}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _unknown_format(path: Path) -> str:
    if path.stat().st_size == 0:
        return "it is empty"
    return "its first bytes are neither torch.save's zip or pickle format nor safetensors'"


def _not_a_checkpoint(path: Path, detail: str, valid: str = VALID_CHECKPOINT) -> ValueError:
    return ValueError(f"{path} is not a checkpoint ({detail}); {valid}")


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict safely: ``weights_only=True`` refuses pickled code.

    Accepts a bare state dict or a dict with ``state_dict``/``model``/``state``
    inside; strips a ``module.`` (DataParallel) prefix. Any other file (not written
    by ``torch.save`` or safetensors) is a ``ValueError`` naming it.
    """
    path = _checkpoint_file(path)
    kind = checkpoint_format(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise _not_a_checkpoint(path, f"not a readable safetensors file: {err}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails in many ways on a file it cannot read
        if kind is None:
            raise _not_a_checkpoint(path, _unknown_format(path)) from None
        detail = (str(err).splitlines() or [""])[0]
        if isinstance(err, pickle.UnpicklingError):
            raise ValueError(
                f"refusing to load {path}: it is not a plain tensor checkpoint (it holds "
                f"pickled objects or code, which tta never executes). Re-save it as a "
                f"state_dict of tensors. Detail: {detail}"
            ) from None
        raise _not_a_checkpoint(path, f"unreadable, truncated or corrupted: torch.load failed with "
                                      f"{type(err).__name__}: {detail}") from None
    for key in ("state_dict", "model", "state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; {VALID_CHECKPOINT}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that says which file and which keys."""
    result = model.load_state_dict(state, strict=False)
    shapes = [
        k for k, v in state.items()
        if k in model.state_dict() and model.state_dict()[k].shape != v.shape
    ]
    if result.missing_keys or result.unexpected_keys or shapes:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


# ----------------------------------------------------------------------------------
# CIFAR-10 ResNets (checkpoints of akamaster/pytorch_resnet_cifar10)
# ----------------------------------------------------------------------------------

# depth -> sha256 prefix; the upstream file name is resnet<depth>-<prefix>.th
_CIFAR_RESNET_SHA256_PREFIX = {
    20: "12fca82f",
    32: "d509ac18",
    44: "014dd654",
    56: "4bfd9763",
}
_CIFAR_RESNET_FILES = {depth: f"resnet{depth}-{prefix}.th"
                       for depth, prefix in _CIFAR_RESNET_SHA256_PREFIX.items()}
_CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


def cifar_resnet_weights(depth: int) -> Path:
    """Path of the pretrained checkpoint under ``$TTA_HOME/models/cifar10``, downloaded
    there if missing. Either way its sha256 is checked once (a cached file by this
    function, a fresh one by :func:`tta.paths.download`); a mismatch is a ``ValueError``."""
    filename = _CIFAR_RESNET_FILES[depth]
    expected = _CIFAR_RESNET_SHA256_PREFIX[depth]
    path = tta_home() / "models" / "cifar10" / filename
    if not path.exists():
        download(_CIFAR_RESNET_URL + filename, path, sha256_prefix=expected)
    elif not (got := sha256_of(path)).startswith(expected):
        raise ValueError(
            f"{path} is corrupted: its sha256 {got[:16]}... does not start with {expected}. Delete it "
            f"(tta then downloads it again) or replace it by hand with {_CIFAR_RESNET_URL + filename}"
        )
    return path


def _make_cifar_factory(depth: int) -> Callable[..., nn.Module]:
    def factory(weights: str | os.PathLike | None = None, pretrained: bool = True) -> nn.Module:
        net = CifarResNet(depth, num_classes=10)
        if weights is not None or pretrained:
            path = Path(weights) if weights is not None else cifar_resnet_weights(depth)
            load_state_into(net, load_checkpoint(path), str(path))
        return ImageClassifier(net, 10, IMAGENET_MEAN, IMAGENET_STD, input_size=(32, 32))

    factory.__doc__ = (
        f"CIFAR-10 ResNet-{depth}, pretrained unless ``pretrained=False``; ``weights`` "
        f"overrides the default $TTA_HOME/models/cifar10/{_CIFAR_RESNET_FILES[depth]}."
    )
    return factory


for _depth in _CIFAR_RESNET_FILES:
    register_model(f"cifar10_resnet{_depth}")(_make_cifar_factory(_depth))
