"""The zoo's manifests (``manifest.json``): reading and checking one, and merging
``$TTA_HOME``'s on top of the bundled one (the rules: :mod:`tta.models.zoo`)."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from .zoo_architectures import ARCHITECTURES, CLIP_ARCHITECTURES

__all__ = ["MANIFEST_NAME", "Manifests", "read_manifests"]

MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_LAYOUT = '{"format": 1, "models": {"<name>": {"architecture": ..., "sha256": ..., "file": ...}}}'


def _manifest_error(path: Path, problem: str, entry: str | None = None) -> ValueError:
    where = f"zoo manifest {path}" + (f", entry {entry!r}" if entry is not None else "")
    return ValueError(f"{where}: {problem}")


def _check_file_name(file: str, path: Path, entry: str, given: bool) -> None:
    """A manifest's ``file`` (or, without one, ``<entry>.pt``) names a file inside the
    zoo folders: relative, no ``..``, no drive (symbolic links are checked where the
    file is found, see :func:`tta.models.zoo.find_checkpoint`)."""
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


def _read_models(path: Path) -> dict[str, Any]:
    """The ``models`` object of the manifest at ``path``, its layout checked."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise _manifest_error(path, f"cannot be read ({err})") from None
    except ValueError as err:
        raise _manifest_error(path, f"is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise _manifest_error(path, f"must be a JSON object {_LAYOUT}, got a {type(data).__name__}")
    if data.get("format", 1) != 1:
        raise _manifest_error(path, f"has format {data['format']!r}, this version of tta reads format 1: "
                                    f"upgrade tta")
    if "models" not in data:
        raise _manifest_error(path, f'has no "models" key: expected {_LAYOUT}')
    models = data["models"]
    if not isinstance(models, dict):
        raise _manifest_error(path, f'"models" must be an object mapping names to entries, got a '
                                    f"{type(models).__name__}")
    return models


def _check_entry(path: Path, name: str, entry: Any, known: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Entry ``name`` of manifest ``path``, checked, its sha256 in lower case."""
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
        raise _manifest_error(path, f'has no "sha256": a model the bundled manifest does not know '
                                    f"needs the sha256 of its checkpoint (64 hex digits, sha256sum "
                                    f"<file>), so that loading it is verified", name)
    _check_file_name(entry.get("file", f"{name}.pt"), path, name, given="file" in entry)
    return dict(entry, **({"sha256": entry["sha256"].lower()} if "sha256" in entry else {}))


def _read_manifest(path: Path, *, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The model entries of the manifest at ``path``, each checked (types, sha256,
    ``file``); a ``ValueError`` naming the file and the entry otherwise. ``known``:
    the entries a model needs no ``sha256`` of its own for (the bundled ones)."""
    return {name: _check_entry(path, name, entry, known) for name, entry in _read_models(path).items()}


class Manifests(NamedTuple):
    """The merged manifests."""

    entries: dict[str, dict[str, Any]]  # name -> merged entry
    sha256_from: dict[str, Path]  # name -> the manifest its sha256 comes from
    overruled: dict[str, tuple[Path, str]]  # name -> ($TTA_HOME manifest, its sha256 the bundled one replaced)


def read_manifests(home_path: Path, bundled_path: Path) -> Manifests:
    """The bundled manifest's entries, with ``$TTA_HOME``'s on top: those add models
    and change fields, but a model the bundled manifest knows keeps its sha256.
    A missing file counts as an empty manifest."""
    bundled = _read_manifest(bundled_path, known={}) if bundled_path.is_file() else {}
    entries = {name: dict(entry) for name, entry in bundled.items()}
    sha256_from = {name: bundled_path for name in bundled}
    overruled: dict[str, tuple[Path, str]] = {}
    if home_path.is_file():
        for name, entry in _read_manifest(home_path, known=bundled).items():
            if name in bundled:
                theirs = entry.get("sha256")
                if theirs is not None and theirs != bundled[name]["sha256"]:
                    overruled[name] = (home_path, theirs)
                entries[name] = {**bundled[name], **entry, "sha256": bundled[name]["sha256"]}
            else:
                entries[name] = entry
                sha256_from[name] = home_path
    return Manifests(entries, sha256_from, overruled)
