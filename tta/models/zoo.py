"""tta's offline model zoo: small CIFAR-10 models trained on CPU by
``benchmarks/zoo/train.py``, shipped with the package.

``tta.load_model("zoo:<name>")`` loads one (``list_models("zoo:*")`` lists them). The
checkpoint is looked up, in order:

1. ``weights=`` if given;
2. ``$TTA_HOME/models/zoo/<name>.pt`` (:func:`home_dir`);
3. the package's own folder, ``tta/models/zoo_weights/<name>.pt`` (:func:`bundled_dir`),
   installed with tta (package data of the wheel; in a git checkout, the tracked files).

``manifest.json`` in the bundled folder records each model's architecture, sha256,
training command and scores; the file's sha256 is checked against it (``verify=False``
skips that, e.g. for weights you re-trained yourself). A ``manifest.json`` in
``$TTA_HOME/models/zoo/`` is read on top of it: it may add models (each with
``architecture`` and a 64-hex-digit ``sha256``) and change the fields of known ones,
but a model the bundled manifest knows keeps the bundled sha256. A ``file`` names a
file inside the zoo folder (relative, no ``..``, no symbolic link out of it). A
malformed manifest is a ``ValueError`` naming the file and the entry. Checkpoints are
fp16 state dicts of plain tensors, loaded with ``weights_only=True`` and cast to float32.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from torch import nn

from .._registry import unknown_name_message
from ..paths import sha256_of, tta_home
from .checkpoint import load_checkpoint, load_state_into
from .classifier import ImageClassifier
from .registry import register_model_family
from .zoo_architectures import ARCHITECTURES, BUILTIN, CLIP_ARCHITECTURES, build_zoo_clip, zoo_clip_classifier
from .zoo_manifest import MANIFEST_NAME, Manifests, read_manifests

__all__ = ["bundled_dir", "home_dir", "list_zoo", "zoo_info", "load_zoo_model", "build_zoo_clip",
           "zoo_clip_classifier", "ARCHITECTURES", "CLIP_ARCHITECTURES"]

PREFIX = "zoo:"

#: The options CLIP zoo models take, with defaults (``classnames=None`` also means CIFAR-10).
CLIP_OPTIONS: dict[str, Any] = dict(classnames="cifar10", templates="photo", ctx_init=None, precision="fp32")


def bundled_dir() -> Path:
    """The zoo folder shipped inside the package, ``tta/models/zoo_weights``: the zoo's
    checkpoints and their ``manifest.json`` (``benchmarks/zoo/train.py`` writes there)."""
    return Path(__file__).resolve().parent / "zoo_weights"


def home_dir() -> Path:
    """``$TTA_HOME/models/zoo``: checkpoints (and a manifest) of your own, looked at
    before the bundled folder."""
    return tta_home() / "models" / "zoo"


def _manifests() -> Manifests:
    return read_manifests(home_dir() / MANIFEST_NAME, bundled_dir() / MANIFEST_NAME)


def list_zoo(pattern: str = "*") -> list[str]:
    """Names of the zoo models (without the ``zoo:`` prefix) matching ``pattern``."""
    return sorted(n for n in set(_manifests().entries) | set(BUILTIN) if fnmatch.fnmatch(n, pattern))


def zoo_info(name: str) -> dict[str, Any]:
    """The manifest entry of ``name`` (training command, scores, sha256...), or
    ``{"architecture": ...}`` only when no manifest is available."""
    return _info(name.removeprefix(PREFIX), _manifests().entries)


def _info(name: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name in entries:
        return dict(entries[name])
    if name in BUILTIN:
        return {"architecture": BUILTIN[name]}
    raise KeyError(unknown_name_message("zoo model", name, set(entries) | set(BUILTIN)))


def _inside(path: Path, folder: Path) -> Path:
    """``path`` (a file found in zoo folder ``folder``) unless, symbolic links
    resolved, it lies outside ``folder``: a ``ValueError`` naming both then."""
    real, root = path.resolve(), folder.resolve()
    if not real.is_relative_to(root):
        raise ValueError(
            f"zoo checkpoint {path} resolves to {real}, outside its folder {root}: zoo checkpoints "
            f"must lie inside it (a link out of it is refused). Copy the file to {path}, or pass "
            f"weights={str(real)!r} to load that file explicitly"
        )
    return path


def _find_checkpoint(name: str, info: dict[str, Any], weights: str | os.PathLike | None) -> Path:
    """The checkpoint file of zoo model ``name``, in the documented lookup order; a
    ``FileNotFoundError`` listing the places looked at otherwise."""
    filename = info.get("file", f"{name}.pt")
    if weights is not None:
        candidates = [(Path(weights), None)]
    else:
        candidates = [(folder / filename, folder) for folder in (home_dir(), bundled_dir())]
    for path, folder in candidates:
        if path.is_file():
            return path if folder is None else _inside(path, folder)
    looked = ", ".join(str(p) for p, _ in candidates)
    sha256 = f" (sha256 {info['sha256']})" if info.get("sha256") else ""
    raise FileNotFoundError(
        f"no checkpoint for zoo model {name!r}: looked at {looked}. Put {filename}{sha256} at "
        f"{home_dir() / filename} or train it with the command in benchmarks/zoo/ "
        f"(README, 'Offline model zoo'). Zoo models: {', '.join(list_zoo())}"
    )


def _verify(path: Path, name: str, expected: str, manifests: Manifests) -> None:
    """A ``ValueError`` unless ``path``'s sha256 is ``expected`` (the manifests' for ``name``)."""
    actual = sha256_of(path)
    if actual == expected:
        return
    note = ""
    if name in manifests.overruled:
        home, theirs = manifests.overruled[name]
        note = (f"; {home} gives {name!r} the sha256 {theirs[:16]}..., but a manifest in $TTA_HOME "
                f"cannot change the sha256 of a model the bundled manifest knows: give your model "
                f"another name there")
    raise ValueError(
        f"{path} is corrupted or not the zoo's {name!r}: its sha256 {actual[:16]}... does not match "
        f"{expected[:16]}... from {manifests.sha256_from.get(name)} (checksum mismatch; pass "
        f"verify=False to load your own weights){note}"
    )


def _clip_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The classifier options of zoo CLIP model ``name``: :data:`CLIP_OPTIONS` updated
    by ``given``, checked."""
    unknown = sorted(set(given) - set(CLIP_OPTIONS))
    if unknown:
        raise TypeError(f"zoo CLIP model {name!r} takes weights, verify, pretrained and "
                        f"{', '.join(CLIP_OPTIONS)}; unexpected {unknown}")
    options = {**CLIP_OPTIONS, **given}
    if options["classnames"] is None:
        options["classnames"] = CLIP_OPTIONS["classnames"]
    if options.pop("precision") != "fp32":
        raise ValueError(f"zoo CLIP models run in fp32, got precision={given['precision']!r}")
    return options


def _architecture(name: str, info: dict[str, Any]) -> str:
    arch = info["architecture"]
    if arch not in ARCHITECTURES and arch not in CLIP_ARCHITECTURES:
        known = sorted(ARCHITECTURES) + sorted(CLIP_ARCHITECTURES)
        raise ValueError(
            f"zoo model {name!r} has architecture {arch!r}, which this version of tta "
            f"does not know ({', '.join(known)}): upgrade tta"
        )
    return arch


def load_zoo_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    verify: bool = True,
    pretrained: bool = True,
    **clip_kwargs: Any,
) -> nn.Module:
    """Zoo model ``name`` (with or without ``zoo:``) in eval mode, taking float RGB in
    [0, 1]. ``verify`` checks the file's sha256 against the manifest when there is
    one (also for ``weights=``); ``pretrained=False`` gives the architecture with
    random weights (smoke tests), no checkpoint needed. CLIP models (``clip_small``,
    ``clip_base``) come as a :class:`~tta.models.clip.CLIPClassifier` and take
    ``classnames`` (default, also for ``None``: ``"cifar10"``), ``templates``,
    ``ctx_init`` and ``precision`` (``"fp32"`` only), as ``load_model("clip:...")`` does."""
    name = name.removeprefix(PREFIX)
    manifests = _manifests()
    info = _info(name, manifests.entries)
    arch = _architecture(name, info)
    is_clip = arch in CLIP_ARCHITECTURES
    if clip_kwargs and not is_clip:
        raise TypeError(f"zoo model {name!r} is not a CLIP model: unexpected {sorted(clip_kwargs)}")
    options = _clip_options(name, clip_kwargs) if is_clip else {}
    net, extra = build_zoo_clip(arch) if is_clip else ARCHITECTURES[arch]()  # extra: tokenizer / classifier kwargs
    if pretrained or weights is not None:
        path = _find_checkpoint(name, info, weights)
        if verify and info.get("sha256"):
            _verify(path, name, info["sha256"], manifests)
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(path).items()}
        load_state_into(net, state, str(path))
    if is_clip:
        return zoo_clip_classifier(net, extra, **options)
    return ImageClassifier(net, **extra).eval()


register_model_family("zoo", load_zoo_model, list_zoo)
