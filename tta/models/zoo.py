"""tta's offline model zoo: small models trained on CPU by ``benchmarks/zoo/train.py``.

``tta.load_model("zoo:<name>")`` loads one. The checkpoint is looked up, in order:

1. ``weights=`` if given;
2. ``$TTA_HOME/models/zoo/<name>.pt``;
3. ``benchmarks/zoo/checkpoints/<name>.pt`` of the source checkout tta is imported
   from (exists only in a git checkout, not in an installed wheel).

``manifest.json`` next to the checkout's checkpoints records each model's
architecture, sha256, training command and scores; the file's sha256 is checked
against it (``verify=False`` skips that, e.g. for weights you re-trained yourself).
A ``manifest.json`` in ``$TTA_HOME/models/zoo/`` is read on top of it: it may add
models (each with ``architecture`` and a 64-hex-digit ``sha256``) and change the
fields of known ones, but a model the checkout's manifest knows keeps the
checkout's sha256. A ``file`` names a file inside the zoo folder (relative, no
``..``, no symbolic link out of it). A malformed manifest is a ``ValueError``
naming the file and the entry. Checkpoints are fp16 state dicts of plain tensors,
loaded with ``weights_only=True`` and cast to float32.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, NamedTuple

from torch import nn

from .._registry import unknown_name_message
from ..paths import sha256_of, tta_home
from .cifar_resnet import CifarResNet
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

__all__ = ["list_zoo", "zoo_info", "zoo_checkpoint", "load_zoo_model", "build_zoo_clip", "zoo_clip_classifier",
           "ARCHITECTURES", "CLIP_ARCHITECTURES"]

PREFIX = "zoo:"
MANIFEST_NAME = "manifest.json"


# ImageClassifier arguments of every zoo classifier: CIFAR-10 pixels, normalised as the
# shared CIFAR ResNets' weights expect
_CIFAR10_INPUT: dict[str, Any] = dict(num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(32, 32))


def _cifar_resnet(depth: int, norm: str = "bn") -> Callable[[], tuple[nn.Module, dict[str, Any]]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        return CifarResNet(depth, num_classes=10, norm=norm), dict(_CIFAR10_INPUT)

    return build


def _timm_cifar(name: str) -> Callable[[], tuple[nn.Module, dict[str, Any]]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        import timm

        from . import timm_cifar  # noqa: F401  (registers tta's timm entrypoints)

        return timm.create_model(name, pretrained=False), dict(_CIFAR10_INPUT)

    return build


# architecture key (the manifest's "architecture") -> (backbone, ImageClassifier kwargs)
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "cifar_resnet20": _cifar_resnet(20),
    "cifar_resnet26_gn": _cifar_resnet(26, "gn"),
    "timm_vit_tiny_patch4_cifar": _timm_cifar("tta_vit_tiny_patch4_cifar"),
}

# open_clip model configs of the zoo's CLIP models: a tta CIFAR ResNet (a timm
# entrypoint of tta.models.timm_cifar) as image tower, its ``linear`` the projection
# into the joint space, and a small text transformer. The token embedding (49408 x
# width, the CLIP BPE vocabulary) dominates the size, hence the narrow text width.
_CLIP_TEXT = dict(context_length=16, vocab_size=49408, width=48, heads=4)
CLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "clip_cifar_resnet20": dict(
        embed_dim=64,
        vision_cfg=dict(timm_model_name="tta_cifar_resnet20", timm_pool="avg", timm_proj="none", image_size=32),
        text_cfg=dict(_CLIP_TEXT, layers=3),
    ),
    "clip_cifar_resnet56": dict(
        embed_dim=64,
        vision_cfg=dict(timm_model_name="tta_cifar_resnet56", timm_pool="avg", timm_proj="none", image_size=32),
        text_cfg=dict(_CLIP_TEXT, layers=4),
    ),
}
# open_clip's preprocess_cfg: CIFAR pixels, normalised as the CIFAR ResNets' weights expect
_CLIP_PREPROCESS = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=32, interpolation="bilinear",
                        resize_mode="squash")

# Architecture of each zoo model, for when no manifest is available (an installed
# package with only $TTA_HOME/models/zoo/<name>.pt).
_BUILTIN: dict[str, str] = {
    "resnet20_bn_jpeg": "cifar_resnet20",
    "resnet26_gn": "cifar_resnet26_gn",
    "vit_tiny_ln": "timm_vit_tiny_patch4_cifar",
    "clip_small": "clip_cifar_resnet20",
    "clip_base": "clip_cifar_resnet56",
}


def build_zoo_clip(arch: str) -> tuple[nn.Module, Callable[..., Any]]:
    """A randomly initialised open_clip ``CLIP`` of zoo architecture ``arch`` and its
    tokenizer (CLIP's BPE at the config's context length)."""
    import copy

    from .clip import _open_clip
    from . import timm_cifar  # noqa: F401  (registers the image towers with timm)

    oc = _open_clip()
    cfg = copy.deepcopy(CLIP_ARCHITECTURES[arch])
    model = oc.CLIP(**cfg)
    model.visual.preprocess_cfg = dict(_CLIP_PREPROCESS)
    return model, oc.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def zoo_clip_classifier(model: nn.Module, tokenizer: Callable[..., Any], *, classnames: Any = "cifar10",
                        templates: Any = "photo", ctx_init: str | None = None) -> nn.Module:
    """A zoo CLIP as a :class:`~tta.models.clip.CLIPClassifier` (CIFAR-10 classes by default)."""
    from .clip import from_open_clip

    return from_open_clip(model, tokenizer, classnames=classnames, templates=templates, ctx_init=ctx_init)


def checkout_dir() -> Path:
    """``benchmarks/zoo/checkpoints`` of the source checkout this package lives in
    (it does not exist for an installed package)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "zoo" / "checkpoints"


def home_dir() -> Path:
    return tta_home() / "models" / "zoo"


def _manifest_paths() -> list[Path]:
    return [home_dir() / MANIFEST_NAME, checkout_dir() / MANIFEST_NAME]


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _manifest_error(path: Path, problem: str, entry: str | None = None) -> ValueError:
    where = f"zoo manifest {path}" + (f", entry {entry!r}" if entry is not None else "")
    return ValueError(f"{where}: {problem}")


def _check_file_name(file: str, path: Path, entry: str, given: bool) -> None:
    """A manifest's ``file`` (or, without one, ``<entry>.pt``) names a file inside the
    zoo folders: relative, no ``..``, no drive (symbolic links are checked where the
    file is found, see :func:`_inside`)."""
    posix = PurePosixPath(file.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file).drive:
        problem = "is absolute"
    elif ".." in posix.parts:
        problem = f'leaves the zoo folder (".."); zoo checkpoints must lie inside {path.parent}'
    elif "\0" in file or posix.name in ("", "."):
        problem = "is not a file name"
    else:
        return
    what = f'"file" {file!r}' if given else f"its name gives the file {file!r}, which"
    raise _manifest_error(path, f"{what} {problem}: name the checkpoint relative to the manifest's "
                                f"folder, e.g. \"file\": \"{PurePosixPath(entry).name or 'model'}.pt\"", entry)


def _read_manifest(path: Path, *, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The model entries of the manifest at ``path``, each checked (types, sha256,
    ``file``); a ``ValueError`` naming the file and the entry otherwise. ``known``:
    the entries a model needs no ``sha256`` of its own for (the checkout's)."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise _manifest_error(path, f"cannot be read ({err})") from None
    except ValueError as err:
        raise _manifest_error(path, f"is not valid JSON ({err}); fix or remove it") from None
    layout = '{"format": 1, "models": {"<name>": {"architecture": ..., "sha256": ..., "file": ...}}}'
    if not isinstance(data, dict):
        raise _manifest_error(path, f"must be a JSON object {layout}, got a {type(data).__name__}")
    if data.get("format", 1) != 1:
        raise _manifest_error(path, f"has format {data['format']!r}, this version of tta reads format 1: "
                                    f"upgrade tta")
    if "models" not in data:
        raise _manifest_error(path, f'has no "models" key: expected {layout}')
    models = data["models"]
    if not isinstance(models, dict):
        raise _manifest_error(path, f'"models" must be an object mapping names to entries, got a '
                                    f"{type(models).__name__}")
    checked: dict[str, dict[str, Any]] = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise _manifest_error(path, f"must be an object, got a {type(entry).__name__}", name)
        for key in ("architecture", "sha256", "file"):
            if key in entry and not isinstance(entry[key], str):
                raise _manifest_error(path, f'"{key}" must be a string, got {entry[key]!r}', name)
        if "architecture" not in entry and name not in known:
            raise _manifest_error(path, f'has no "architecture" (one of '
                                        f"{', '.join(sorted(ARCHITECTURES) + sorted(CLIP_ARCHITECTURES))})", name)
        if "sha256" in entry:
            if not _SHA256.fullmatch(entry["sha256"]):
                raise _manifest_error(path, f'"sha256" must be 64 hex digits (sha256sum of the checkpoint), '
                                            f"got {entry['sha256']!r}", name)
        elif name not in known:
            raise _manifest_error(path, f'has no "sha256": a model the checkout\'s manifest does not know '
                                        f"needs the sha256 of its checkpoint (64 hex digits, sha256sum "
                                        f"<file>), so that loading it is verified", name)
        _check_file_name(entry.get("file", f"{name}.pt"), path, name, given="file" in entry)
        checked[name] = dict(entry, **({"sha256": entry["sha256"].lower()} if "sha256" in entry else {}))
    return checked


class _Manifests(NamedTuple):
    entries: dict[str, dict[str, Any]]  # name -> merged entry
    sha256_from: dict[str, Path]  # name -> the manifest its sha256 comes from
    overruled: dict[str, tuple[Path, str]]  # name -> ($TTA_HOME manifest, its sha256 the checkout's replaced)


def _manifests() -> _Manifests:
    """The checkout's manifest entries, with ``$TTA_HOME``'s on top: those add models
    and change fields, but a model the checkout knows keeps the checkout's sha256."""
    home_path, checkout_path = _manifest_paths()
    checkout = _read_manifest(checkout_path, known={}) if checkout_path.is_file() else {}
    entries = {name: dict(entry) for name, entry in checkout.items()}
    sha256_from = {name: checkout_path for name in checkout}
    overruled: dict[str, tuple[Path, str]] = {}
    if home_path.is_file():
        for name, entry in _read_manifest(home_path, known=checkout).items():
            if name in checkout:
                theirs = entry.get("sha256")
                if theirs is not None and theirs != checkout[name]["sha256"]:
                    overruled[name] = (home_path, theirs)
                entries[name] = {**checkout[name], **entry, "sha256": checkout[name]["sha256"]}
            else:
                entries[name] = entry
                sha256_from[name] = home_path
    return _Manifests(entries, sha256_from, overruled)


def _manifest() -> dict[str, dict[str, Any]]:
    """The manifests' model entries (see :func:`_manifests`)."""
    return _manifests().entries


def list_zoo(pattern: str = "*") -> list[str]:
    """Names of the zoo models (without the ``zoo:`` prefix) matching ``pattern``."""
    import fnmatch

    return sorted(n for n in set(_manifest()) | set(_BUILTIN) if fnmatch.fnmatch(n, pattern))


def zoo_info(name: str) -> dict[str, Any]:
    """The manifest entry of ``name`` (training command, scores, sha256...), or
    ``{"architecture": ...}`` only when no manifest is available."""
    return _info(name.removeprefix(PREFIX), _manifest())


def _info(name: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if name in entries:
        return dict(entries[name])
    if name in _BUILTIN:
        return {"architecture": _BUILTIN[name]}
    known = sorted(set(entries) | set(_BUILTIN))
    raise KeyError(unknown_name_message("zoo model", name, known))


def zoo_checkpoint(name: str, weights: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of zoo model ``name`` is; a ``FileNotFoundError`` that
    lists the places looked at otherwise."""
    name = name.removeprefix(PREFIX)
    return _find_checkpoint(name, zoo_info(name), weights)


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
    filename = info.get("file", f"{name}.pt")
    if weights is not None:
        candidates = [(Path(weights), None)]
    else:
        candidates = [(folder / filename, folder) for folder in (home_dir(), checkout_dir())]
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


#: The options CLIP zoo models take (as ``load_model("clip:zoo/<name>")`` does), with defaults.
CLIP_OPTIONS: dict[str, Any] = dict(classnames="cifar10", templates="photo", ctx_init=None, precision="fp32")


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
    random weights (smoke tests), no checkpoint needed. CLIP models (``clip_small``, ``clip_base``) come as
    a :class:`~tta.models.clip.CLIPClassifier` and take ``classnames`` (default, also for
    ``None``: ``"cifar10"``), ``templates``, ``ctx_init`` and ``precision`` (``"fp32"``
    only), the same options with the same meaning as ``load_model("clip:zoo/<name>")``."""
    from . import load_checkpoint, load_state_into

    name = name.removeprefix(PREFIX)
    manifests = _manifests()
    info = _info(name, manifests.entries)
    arch = info["architecture"]
    if arch not in ARCHITECTURES and arch not in CLIP_ARCHITECTURES:
        known = sorted(ARCHITECTURES) + sorted(CLIP_ARCHITECTURES)
        raise ValueError(
            f"zoo model {name!r} has architecture {arch!r}, which this version of tta "
            f"does not know ({', '.join(known)}): upgrade tta"
        )
    is_clip = arch in CLIP_ARCHITECTURES
    if clip_kwargs and not is_clip:
        raise TypeError(f"zoo model {name!r} is not a CLIP model: unexpected {sorted(clip_kwargs)}")
    if is_clip:
        unknown = sorted(set(clip_kwargs) - set(CLIP_OPTIONS))
        if unknown:
            raise TypeError(f"zoo CLIP model {name!r} takes weights, verify, pretrained and "
                            f"{', '.join(CLIP_OPTIONS)}; unexpected {unknown}")
        options = {**CLIP_OPTIONS, **clip_kwargs}
        if options["classnames"] is None:
            options["classnames"] = "cifar10"  # a zoo CLIP's classes, as for clip:zoo/<name>
        if options.pop("precision") != "fp32":
            raise ValueError(f"zoo CLIP models run in fp32, got precision={clip_kwargs['precision']!r}")
    net, extra = build_zoo_clip(arch) if is_clip else ARCHITECTURES[arch]()  # extra: tokenizer / classifier kwargs
    if pretrained or weights is not None:
        path = _find_checkpoint(name, info, weights)
        expected = info.get("sha256")
        if verify and expected:
            actual = sha256_of(path)
            if actual != expected:
                source = manifests.sha256_from.get(name)
                note = ""
                if name in manifests.overruled:
                    home, theirs = manifests.overruled[name]
                    note = (f"; {home} gives {name!r} the sha256 {theirs[:16]}..., but a manifest in "
                            f"$TTA_HOME cannot change the sha256 of a model the checkout's manifest "
                            f"knows: give your model another name there")
                raise ValueError(
                    f"{path} is corrupted or not the zoo's {name!r}: its sha256 {actual[:16]}... "
                    f"does not match {expected[:16]}... from {source} (checksum mismatch; "
                    f"pass verify=False to load your own weights){note}"
                )
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_checkpoint(path).items()}
        load_state_into(net, state, str(path))
    if is_clip:
        return zoo_clip_classifier(net, extra, **options)
    return ImageClassifier(net, **extra).eval()
