"""``tta-data cifar10-c``: CIFAR-10-C checked, and extracted, for ``data=cifar10c_disk``.

:func:`check_cifar10c_folder` checks a folder as ``data=cifar10c_disk`` reads it,
``<root>/<corruption>.npy`` + ``labels.npy``, from the ``.npy`` headers;
:func:`prepare_cifar10c` also extracts the published ``CIFAR-10-C.tar`` (checked
against its published size, md5 and sha256) into ``<root>/data/CIFAR-10-C``.
"""

from __future__ import annotations

import os
import shlex
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ._files import (
    Log,
    PublishedFile,
    _abs,
    _check_root,
    _check_size,
    _extract_tar,
    _home,
    _move_into_place,
    _temp_folder_for,
)
from .report import DataNotFoundError, DataReport, _short_problems, _wanted_corruptions, bench_arg

CIFAR10C_RECORD = "https://zenodo.org/records/2535967"
# md5: as the Zenodo record lists it (also used by torchvision-style loaders across
# many projects); size and sha256: tensorflow_datasets'
# tensorflow_datasets/url_checksums/cifar10_corrupted.txt.
CIFAR10C_TAR = PublishedFile(
    name="CIFAR-10-C.tar",
    url=f"{CIFAR10C_RECORD}/files/CIFAR-10-C.tar",
    md5="56bf5dcef84df0e2308c6dcbcbbd8499",
    sha256="c72763e101c723b7c507b96205f7e938912a5d587376173b825850cf3cb876a7",
    size=2918471680,
    origin="md5 from the Zenodo record, size and sha256 from tensorflow_datasets' url_checksums",
)


def _cifar10c_howto(root_dir: Path) -> str:
    here, parent = shlex.quote(str(root_dir)), shlex.quote(str(root_dir.parent))
    return (
        f"CIFAR-10-C is not at {root_dir}. It is published on Zenodo ({CIFAR10C_RECORD}) as "
        f"{CIFAR10C_TAR.name} ({CIFAR10C_TAR.size / 2**30:.1f} GiB, md5 {CIFAR10C_TAR.md5}): {CIFAR10C_TAR.url}\n"
        "Download it, then either\n"
        f"  tta-data cifar10-c --source /path/to/{CIFAR10C_TAR.name}      # checks it, extracts it to {root_dir}\n"
        f"or extract it yourself (mkdir -p {parent} && tar -xf {CIFAR10C_TAR.name} -C {parent}) "
        "and check the folder with\n"
        f"  tta-data cifar10-c --source {here}\n"
        f"then run: tta-bench data=cifar10c_disk {bench_arg('data.root', root_dir)}"
    )


def labels_npy_problem(labels: np.ndarray, num_classes: int | None = 10) -> str | None:
    """Why ``labels`` (a ``labels.npy`` array) cannot be CIFAR-10-C's labels, or None:
    ``(5 * N,)`` integers in ``0..num_classes-1`` (``None``: any index >= 0, for
    CIFAR-100-C and the like). The one check of ``tta-data cifar10-c`` and of
    ``data=cifar10c_disk``: float labels would be truncated, negative ones never
    match a prediction."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] % 5 or not labels.shape[0]:
        return f"holds {labels.dtype} {labels.shape}: expected integers (5 * N,), severities 1-5 stacked"
    lo, hi = int(labels.min()), int(labels.max())
    if num_classes is not None and (lo < 0 or hi >= num_classes):
        return f"labels outside 0..{num_classes - 1} (min {lo}, max {hi})"
    if lo < 0:
        return f"negative labels (min {lo}, max {hi}): expected class indices, 0 or more"
    return None


def images_npy_problem(images: np.ndarray, size: tuple[int, int] | None = (32, 32)) -> str | None:
    """Why ``images`` (a ``<corruption>.npy`` array) cannot be CIFAR-10-C's images of
    one corruption, or None: uint8 ``(5 * N, H, W, 3)`` with ``(H, W) == size``
    (``None``: any size). Shared as :func:`labels_npy_problem` is."""
    h, w = size if size is not None else ("H", "W")
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] % 5
            or (size is not None and images.shape[1:3] != tuple(size))):
        return f"holds {images.dtype} {images.shape}: expected uint8 (5 * N, {h}, {w}, 3), severities 1-5 stacked"
    return None


def check_cifar10c_folder(
    folder: str | os.PathLike, corruptions: str | Sequence[str] | None = None,
) -> DataReport:
    """Check a CIFAR-10-C folder as ``data=cifar10c_disk`` reads it, without loading
    the arrays (shapes and dtypes from the ``.npy`` headers, ``mmap_mode="r"``).

    ``labels.npy``: ``(5 * N,)`` integers in 0..9; each ``<corruption>.npy``: uint8
    ``(5 * N, 32, 32, 3)`` (severities 1-5 stacked). ``corruptions``: the names to
    require, a sequence or one name as a string (default: the 15 benchmark
    corruptions required, the 4 extras checked when present; ``"all"``: all 19)."""
    folder = _abs(folder)
    required, optional = _wanted_corruptions(corruptions)
    report = DataReport("CIFAR-10-C", folder, corruptions=required)
    if not folder.is_dir():
        report.missing = ["labels.npy"] + [f"{c}.npy" for c in required]
        report.notes.append(f"{folder} is not a folder")
        return report
    n_labels: int | None = None
    label_path = folder / "labels.npy"
    if not label_path.is_file():
        report.missing.append("labels.npy")
    else:
        try:
            labels = np.load(label_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            report.bad["labels.npy"] = f"not a readable .npy file ({err})"
        else:
            problem = labels_npy_problem(labels)
            if problem:
                report.bad["labels.npy"] = problem
            else:
                n_labels = labels.shape[0]
                report.present.append("labels.npy")
                if n_labels != 50000:
                    report.notes.append(f"labels.npy has {n_labels} labels (the published set: 50000, "
                                        "5 severities x 10000)")
    for name in required + optional:
        path = folder / f"{name}.npy"
        key = f"{name}.npy"
        if not path.is_file():
            (report.missing if name in required else report.optional_missing).append(key)
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            report.bad[key] = f"not a readable .npy file ({err})"
            continue
        problem = images_npy_problem(arr)
        if problem:
            report.bad[key] = problem
        elif n_labels is not None and arr.shape[0] != n_labels:
            report.bad[key] = f"{arr.shape[0]} images but labels.npy has {n_labels} labels"
        else:
            report.present.append(key)
            report.counts[key] = int(arr.shape[0])
    known = {f"{c}.npy" for c in required + optional} | {"labels.npy"}
    others = sorted(p.name for p in folder.glob("*.npy") if p.name not in known)
    if others:
        report.notes.append(f"other .npy files (not checked): {', '.join(others)}")
    return report


def _find_cifar10c_folder(tmp: Path) -> Path:
    """Where the extracted tar's content lies: ``tmp``, or the one folder in it."""
    if (tmp / "labels.npy").exists():
        return tmp
    subdirs = [p for p in tmp.iterdir() if p.is_dir()]
    if len(subdirs) == 1:
        return subdirs[0]
    return tmp


def prepare_cifar10c(
    source: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    corruptions: str | Sequence[str] | None = None,
    verify: bool = True,
    *,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
) -> DataReport:
    """Check CIFAR-10-C, and extract it first when ``source`` is ``CIFAR-10-C.tar``.

    Args:
        source: ``CIFAR-10-C.tar`` (checked against its published size, md5 and
            sha256, extracted to ``<root>/data/CIFAR-10-C``), or an extracted folder
            (checked in place). ``None``: the folder ``<root>/data/CIFAR-10-C``.
        root: a ``$TTA_HOME``; default :func:`tta.paths.tta_home`.
        corruptions: see :func:`check_cifar10c_folder`.
        verify: check the tar's checksums (``False``: a modified copy).
        force: replace an existing ``<root>/data/CIFAR-10-C`` with the tar's content.

    Returns:
        The :class:`DataReport` of the folder (``.usable``, ``.summary()``, ``.next_step()``).

    Raises:
        DataNotFoundError: no ``source`` and nothing at the default folder (the
            message says where the published file is and what to run).
        ChecksumError, FileExistsError, FileNotFoundError, ValueError.
    """
    _wanted_corruptions(corruptions)  # bad names fail before any work
    _check_root(root)
    if source is not None:
        source = _abs(source)
        if not source.exists():
            raise FileNotFoundError(f"--source {source} does not exist: expected {CIFAR10C_TAR.name} or the "
                                    f"extracted CIFAR-10-C folder (<corruption>.npy + labels.npy)")
        if source.is_dir():  # checked in place: no $TTA_HOME needed
            report = check_cifar10c_folder(source, corruptions)
            report.notes.append(f"no checksums are published for the extracted files (only for {CIFAR10C_TAR.name})")
            return report
    root_dir = _home(root) / "data" / "CIFAR-10-C"
    if source is None:
        if not root_dir.is_dir():
            raise DataNotFoundError(_cifar10c_howto(root_dir))
        return check_cifar10c_folder(root_dir, corruptions)
    if not tarfile.is_tarfile(source):
        raise ValueError(f"--source {source} is neither a tar archive nor a folder: expected "
                         f"{CIFAR10C_TAR.name} or the extracted CIFAR-10-C folder")
    if root_dir.exists():
        existing = check_cifar10c_folder(root_dir, corruptions)
        if existing.usable and not force:
            log(f"{root_dir} already holds a usable CIFAR-10-C: nothing extracted (--force replaces it)")
            return existing
        if not force:
            raise FileExistsError(
                f"{root_dir} exists but is not a usable CIFAR-10-C ({_short_problems(existing)}): remove it, "
                "or pass --force (force=True) to replace it with the tar's content"
            )
    published = CIFAR10C_TAR
    if verify:
        _check_size(source, published)
    with _temp_folder_for(root_dir, log) as tmp:
        _extract_tar(source, tmp, published, verify, progress, log)
        content = _find_cifar10c_folder(tmp)
        report = check_cifar10c_folder(content, corruptions)
        if not report.usable:
            report.root = source
            report.notes.append(f"nothing was written to {root_dir}")
            return report
        _move_into_place(content, root_dir)  # tmp itself, or the one folder in it
    log(f"extracted {source} to {root_dir}")
    return check_cifar10c_folder(root_dir, corruptions)

