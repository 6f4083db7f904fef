"""The file handling under every ``tta-data`` subcommand (private to :mod:`tta.data`).

- Checking files against what was published: :class:`PublishedFile` (an archive,
  its URL and checksums), :class:`ChecksumError`, hashing with a progress bar.
- Writing a folder atomically: a temporary folder beside the target, renamed into
  place when complete (:func:`_temp_folder_for`, :func:`_move_into_place`); the
  temporary folders of a killed earlier run are removed.
- Extracting a tar archive safely (no absolute paths, no ``..``, no links) in one
  streaming pass that also checks its published checksums (:func:`_extract_tar`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from ..paths import tta_home
from . import is_image_file

#: Where the messages of a ``prepare_*`` function go (``print`` by default).
Log = Callable[[str], None]

_NO_VERIFY = "To use a modified copy anyway, pass --no-verify (verify=False from Python)"
#: How to write elsewhere, for the errors of a folder tta-data cannot write to.
_WRITE_ELSEWHERE = "choose a writable place with --root DIR (root=DIR from Python) or another TTA_HOME"


# ----------------------------------------------------------------------------------
# Published files and their checksums
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedFile:
    """A published archive and the checksums published for it (``None``: none known)."""

    name: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    corruptions: tuple[str, ...] = ()
    origin: str = ""


class ChecksumError(RuntimeError):
    """A file does not match its published checksum; the message names the file,
    both checksums and the way to go on anyway (``--no-verify`` / ``verify=False``)."""


def _mismatch(what: str, algorithm: str, expected: str, actual: str, fix: str) -> ChecksumError:
    return ChecksumError(
        f"{what}: {algorithm} {actual} does not match the published {algorithm} {expected}. "
        f"The file is damaged or not the published one: {fix}. {_NO_VERIFY}"
    )


def _check_size(tar_path: Path, published: PublishedFile) -> None:
    size = tar_path.stat().st_size
    if published.size is not None and size != published.size:
        raise ChecksumError(
            f"{tar_path}: {size} bytes, the published {published.name} has {published.size} "
            f"(an incomplete download?): download it again from {published.url}. {_NO_VERIFY}"
        )


def _verify_digests(tar_path: Path, published: PublishedFile, digests: dict[str, str], log: Log) -> None:
    for algorithm, got in digests.items():
        expected = getattr(published, algorithm)
        if got != expected:
            raise _mismatch(str(tar_path), algorithm, expected, got,
                            f"download {published.name} again from {published.url}")
    if digests:
        log(f"{tar_path}: {' and '.join(digests)} match the published {published.name} ({published.origin})")


def _bar(total: int | None, desc: str, progress: bool, unit: str = "it") -> tqdm:
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)


class _HashingReader:
    """A read-only file wrapper that feeds every byte read through hashers and a
    progress bar (so a tar is hashed while it is extracted, in one pass)."""

    def __init__(self, fh: BinaryIO, algorithms: Iterable[str], bar: tqdm | None = None):
        self._fh = fh
        self.hashers = {a: hashlib.new(a) for a in algorithms}
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        for h in self.hashers.values():
            h.update(data)
        if self._bar is not None:
            self._bar.update(len(data))
        return data

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: the end-of-archive padding."""
        while self.read(1 << 20):
            pass

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def _hash_file(path: Path, algorithms: Sequence[str], progress: bool, desc: str | None = None) -> dict[str, str]:
    """Hex digests of a file, read once, with a progress bar in bytes."""
    with open(path, "rb") as fh, _bar(path.stat().st_size, desc or f"checksum {path.name}", progress, "B") as bar:
        reader = _HashingReader(fh, algorithms, bar)
        reader.drain()
    return reader.hexdigests()


# ----------------------------------------------------------------------------------
# Paths and atomic folders
# ----------------------------------------------------------------------------------


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def _check_root(root: str | os.PathLike | None) -> None:
    """Refuse an empty ``root``: ``Path("")`` is the current folder, which nobody
    means (e.g. ``--root "$UNSET_VARIABLE"``), as :func:`tta.paths.tta_home` refuses
    an empty ``TTA_HOME``."""
    if isinstance(root, (str, bytes)) and not root.strip():
        raise ValueError(f"--root {root!r} is empty (root= from Python): give the folder to write under, or "
                         "leave it out to write under $TTA_HOME")


def _home(root: str | os.PathLike | None) -> Path:
    """The ``$TTA_HOME`` to write under: ``root``, or :func:`tta.paths.tta_home`
    (looked up only here, where it is needed: a folder checked in place needs none)."""
    _check_root(root)
    if root is not None:
        return _abs(root)
    try:
        return tta_home()
    except ValueError as err:  # set but empty
        raise ValueError(f"{err}; or pass --root DIR (root=DIR from Python)") from None


def _home_or_none() -> Path | None:
    """:func:`tta.paths.tta_home`, or None where ``TTA_HOME`` is set but empty: for
    help texts and hints, which must not fail on it."""
    try:
        return tta_home()
    except ValueError:
        return None


def _count_images(folder: str | os.PathLike) -> int:
    """Image files (by extension, not opened) directly in ``folder``."""
    return sum(1 for f in os.scandir(folder) if is_image_file(f.name) and f.is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(parent: Path, name: str, log: Log) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` folders left by an
    interrupted (killed) earlier run whose process is gone."""
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{name}.{kind}-*"):
            try:
                pid = int(path.name[len(f".{name}.{kind}-"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed {path}, left by an interrupted earlier run")


def _temp_dir(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside ``target`` (same file system, so a rename moves it
    into place), created with the umask's permissions. An ``OSError`` that names
    ``target`` and how to write elsewhere when its folder cannot be written (a
    read-only ``$TTA_HOME``, no permission, a full disk)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise OSError(f"cannot write {target}: {err.strerror or err} ({err.filename or target.parent}); "
                      f"{_WRITE_ELSEWHERE}") from err


@contextlib.contextmanager
def _temp_folder_for(target: Path, log: Log) -> Iterator[Path]:
    """A new temporary folder beside ``target`` to build it in (after removing the
    ones a killed earlier run left); removed on leaving, whatever happened, with
    all that was not moved into place out of it."""
    _remove_leftovers(target.parent, target.name, log)
    tmp = _temp_dir(target)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` (the caller checked it may
    go) is renamed aside first and removed after, so ``target`` is never half there."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if target.exists() or target.is_symlink():
        old = _temp_dir(target, "old")
        old.rmdir()
        os.rename(target, old)
        os.rename(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, target)


# ----------------------------------------------------------------------------------
# Tar extraction (CIFAR-10-C, ImageNet-C)
# ----------------------------------------------------------------------------------


def _safe_parts(name: str, where: Path) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts:
        raise ValueError(f"{where} holds the unsafe member {name!r} (absolute or with ..): refusing to extract it")
    return parts


def _extract_tar(
    tar_path: Path, dest: Path, published: PublishedFile, verify: bool, progress: bool, log: Log,
    strip: Callable[[tuple[str, ...]], tuple[str, ...] | None] = lambda parts: parts,
) -> None:
    """Extract the regular files and folders of ``tar_path`` into ``dest`` in one
    streaming pass that also hashes the file, then (``verify``) compare the digests
    with the ``published`` ones (:class:`ChecksumError` when one differs) or (not
    ``verify``) log that they were not checked. ``strip`` maps a member's path parts
    to where it goes under ``dest`` (``None``: skip it)."""
    algorithms = [a for a in ("md5", "sha256") if verify and getattr(published, a)]
    size = tar_path.stat().st_size
    with open(tar_path, "rb") as fh, _bar(size, f"extract {tar_path.name}", progress, "B") as bar:
        reader = _HashingReader(fh, algorithms, bar)
        made: set[Path] = set()

        def mkdir(path: Path) -> None:
            if path not in made:
                path.mkdir(parents=True, exist_ok=True)
                made.add(path)

        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                for member in tar:
                    parts = strip(_safe_parts(member.name, tar_path))
                    if not parts:
                        continue
                    out = dest.joinpath(*parts)
                    if member.isdir():
                        mkdir(out)
                    elif member.isfile():  # links, devices and the like are left out
                        mkdir(out.parent)
                        src = tar.extractfile(member)
                        with open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)  # type: ignore[misc]
        except tarfile.TarError as err:
            raise ValueError(f"{tar_path} is not a readable tar archive ({err})") from err
        reader.drain()
    if verify:
        _verify_digests(tar_path, published, reader.hexdigests(), log)
    else:
        # "checksums" where more than one is published (CIFAR-10-C: size, md5, sha256)
        known = [a for a in ("size", "md5", "sha256") if getattr(published, a) is not None]
        log(f"{tar_path}: {'checksums' if len(known) > 1 else 'checksum'} not checked (--no-verify)")
