"""Where tta looks for data and weights.

Everything lives under one root, ``$TTA_HOME`` (default ``~/.cache/tta``), laid out
as ``data/cifar10/{train,test}``, ``models/cifar10/*.th``, ``data/imagenet-c-frost``.
The root may be read-only (CI points it at a shared folder): tta never writes there
unless it has to download a missing file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["tta_home", "sha256_of", "download", "atomic_write_bytes"]


def tta_home() -> Path:
    """Root of tta's data and weights: ``$TTA_HOME`` or ``~/.cache/tta``, as an
    absolute path (a relative ``$TTA_HOME`` is taken from the current directory).
    A set but empty ``$TTA_HOME`` is an error (it would otherwise silently be the
    current directory, e.g. for ``TTA_HOME=$UNSET_VARIABLE``)."""
    value = os.environ.get("TTA_HOME", "~/.cache/tta")
    if not value.strip():
        raise ValueError(
            "TTA_HOME is set but empty: set it to the folder holding tta's data and weights, "
            "or unset it to use ~/.cache/tta"
        )
    # abspath also folds "..", so ../shared and its absolute spelling are one root
    return Path(os.path.abspath(Path(value).expanduser()))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers
    never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(url: str, dest: str | os.PathLike, sha256_prefix: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (atomically) and check its sha256 prefix.

    Raises ``RuntimeError`` when the file cannot be fetched (no network) or cannot be
    written (a read-only ``$TTA_HOME``, a full disk), naming the URL, the exact path
    to place the file at by hand and its sha256 (prefix).
    """
    dest = Path(dest)
    checksum = f", sha256 {sha256_prefix}..." if sha256_prefix else ""
    by_hand = f"place the file by hand at {dest} (from {url}{checksum})"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
        raise RuntimeError(
            f"{dest} is missing and cannot be downloaded there: {dest.parent} is not writable ({err}; "
            f"a read-only $TTA_HOME?). Either {by_hand}, or point TTA_HOME at a writable folder"
        ) from err
    os.close(fd)
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        except OSError as err:
            raise RuntimeError(f"could not download {url} ({err}); {by_hand}") from err
        if sha256_prefix is not None:
            got = sha256_of(tmp)
            if not got.startswith(sha256_prefix):
                raise RuntimeError(
                    f"checksum mismatch for {url}: expected sha256 {sha256_prefix}..., got {got}; "
                    f"nothing was written to {dest}"
                )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
