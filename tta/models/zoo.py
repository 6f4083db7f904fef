"""tta's offline model zoo: small models trained on CPU by ``benchmarks/zoo/train.py``.

``tta.load_model("zoo:<name>")`` loads one. The checkpoint is looked up, in order:

1. ``weights=`` if given;
2. ``$TTA_HOME/models/zoo/<name>.pt``;
3. ``benchmarks/zoo/checkpoints/<name>.pt`` of the source checkout tta is imported
   from (exists only in a git checkout, not in an installed wheel).

``manifest.json`` (in ``$TTA_HOME/models/zoo/``, else next to the checkout's
checkpoints) records each model's architecture, sha256, training command and
scores. When it is available the file's sha256 is checked against it
(``verify=False`` skips that, e.g. for weights you re-trained yourself). Checkpoints
are fp16 state dicts of plain tensors, loaded with ``weights_only=True`` and cast
to float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .._registry import unknown_name_message
from ..paths import sha256_of, tta_home
from .cifar_resnet import CifarResNet
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

__all__ = ["list_zoo", "zoo_info", "zoo_checkpoint", "load_zoo_model", "ARCHITECTURES"]

PREFIX = "zoo:"
MANIFEST_NAME = "manifest.json"


def _cifar_resnet(depth: int) -> Callable[[], tuple[nn.Module, dict[str, Any]]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        return CifarResNet(depth, num_classes=10), dict(
            num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(32, 32)
        )

    return build


# architecture key (the manifest's "architecture") -> (backbone, ImageClassifier kwargs)
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "cifar_resnet20": _cifar_resnet(20),
}

# Architecture of each zoo model, for when no manifest is available (an installed
# package with only $TTA_HOME/models/zoo/<name>.pt).
_BUILTIN: dict[str, str] = {
    "resnet20_bn_jpeg": "cifar_resnet20",
}


def checkout_dir() -> Path:
    """``benchmarks/zoo/checkpoints`` of the source checkout this package lives in
    (it does not exist for an installed package)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "zoo" / "checkpoints"


def home_dir() -> Path:
    return tta_home() / "models" / "zoo"


def _manifest_paths() -> list[Path]:
    return [home_dir() / MANIFEST_NAME, checkout_dir() / MANIFEST_NAME]


def _manifest() -> dict[str, dict[str, Any]]:
    """The manifests' model entries; ``$TTA_HOME``'s entries win over the checkout's."""
    models: dict[str, dict[str, Any]] = {}
    for path in reversed(_manifest_paths()):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read the zoo manifest {path}: {err}") from None
            models.update(data.get("models", {}))
    return models


def list_zoo(pattern: str = "*") -> list[str]:
    """Names of the zoo models (without the ``zoo:`` prefix) matching ``pattern``."""
    import fnmatch

    return sorted(n for n in set(_manifest()) | set(_BUILTIN) if fnmatch.fnmatch(n, pattern))


def zoo_info(name: str) -> dict[str, Any]:
    """The manifest entry of ``name`` (training command, scores, sha256...), or
    ``{"architecture": ...}`` only when no manifest is available."""
    name = name.removeprefix(PREFIX)
    entries = _manifest()
    if name in entries:
        return dict(entries[name])
    if name in _BUILTIN:
        return {"architecture": _BUILTIN[name]}
    raise KeyError(unknown_name_message("zoo model", name, list_zoo()))


def zoo_checkpoint(name: str, weights: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of zoo model ``name`` is; a ``FileNotFoundError`` that
    lists the places looked at otherwise."""
    name = name.removeprefix(PREFIX)
    info = zoo_info(name)
    filename = info.get("file", f"{name}.pt")
    candidates = (
        [Path(weights)] if weights is not None else [home_dir() / filename, checkout_dir() / filename]
    )
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no checkpoint for zoo model {name!r}: looked at {looked}. Put {filename} in "
        f"$TTA_HOME/models/zoo/ or train it with `python benchmarks/zoo/train.py {name}`. "
        f"Zoo models: {', '.join(list_zoo())}"
    )


def load_zoo_model(
    name: str, *, weights: str | os.PathLike | None = None, verify: bool = True
) -> nn.Module:
    """Zoo model ``name`` (with or without ``zoo:``) in eval mode, taking float RGB in
    [0, 1]. ``verify`` checks the file's sha256 against the manifest when there is
    one (also for ``weights=``)."""
    from . import load_checkpoint, load_state_into

    name = name.removeprefix(PREFIX)
    info = zoo_info(name)
    arch = info["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"zoo model {name!r} has architecture {arch!r}, which this version of tta "
            f"does not know ({', '.join(sorted(ARCHITECTURES))}): upgrade tta"
        )
    path = zoo_checkpoint(name, weights)
    expected = info.get("sha256")
    if verify and expected:
        actual = sha256_of(path)
        if actual != expected:
            raise ValueError(
                f"{path} is corrupted or not the zoo's {name!r}: its sha256 {actual[:16]}... "
                f"does not match the manifest's {expected[:16]}... (checksum mismatch; "
                f"pass verify=False to load your own weights)"
            )
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(path).items()}
    backbone, kwargs = ARCHITECTURES[arch]()
    load_state_into(backbone, state, str(path))
    return ImageClassifier(backbone, **kwargs).eval()

