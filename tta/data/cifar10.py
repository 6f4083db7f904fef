"""``tta-data cifar10``: CIFAR-10 as lossless PNG files in the ImageFolder layout.

:func:`prepare_cifar10` writes ``<root>/data/cifar10/{train,test}/<class>/<NNNN>.png``
(numbered per class in the published order) from the published python archive
(:mod:`tta.data.cifar10_archive`), each split folder atomically, with a marker file
recording what it holds, so a complete split is recognised and left as it is.
:func:`cifar10_next_step` is the ``tta-bench`` command line that reads them.
"""

from __future__ import annotations

import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import is_class_folder
from ._files import Log, _abs, _bar, _count_images, _home, _home_or_none, _move_into_place, _temp_folder_for
from .cifar10_archive import (
    CIFAR10_CLASSES,
    CIFAR10_META,
    CIFAR10_PER_CLASS,
    CIFAR10_SPLIT_FILES,
    _decode_batch,
    _decode_classes,
    _download_cifar10,
    _read_cifar10_source,
)
from .report import bench_arg, unique_choices

#: Name of the file :func:`prepare_cifar10` leaves in each split folder it writes.
MARKER = ".tta-data.json"


def _image_counts(folder: Path) -> dict[str, int]:
    """Image files per class folder of a split folder (hidden folders, ``__MACOSX``
    and ``@eaDir`` are no classes: :func:`tta.data.is_class_folder`, as everywhere)."""
    return {entry.name: _count_images(entry.path) for entry in os.scandir(folder)
            if entry.is_dir() and is_class_folder(entry.name)}


def _split_state(folder: Path, split: str) -> tuple[str, str]:
    """``("missing" | "complete" | "incomplete", detail)`` of a CIFAR-10 split folder.

    Complete: the class folders hold the image counts the marker file written by
    :func:`prepare_cifar10` records, or (a copy made otherwise, e.g. JPEG) the 10
    CIFAR-10 classes with the published counts per class."""
    if not folder.exists() and not folder.is_symlink():
        return "missing", "absent"
    if not folder.is_dir():
        return "incomplete", "not a folder"
    if not any(folder.iterdir()):
        return "missing", "empty"
    expected = {c: CIFAR10_PER_CLASS[split] for c in CIFAR10_CLASSES}
    marker = folder / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            expected = dict(zip(info["classes"], info["counts"]))
        except (ValueError, KeyError, TypeError):
            return "incomplete", f"unreadable {MARKER}"
    counts = _image_counts(folder)
    if counts == expected:
        return "complete", f"{sum(counts.values())} images in {len(counts)} class folders"
    problems = []
    absent = [c for c in expected if c not in counts]
    if absent:
        problems.append(f"class folders missing: {', '.join(absent)}")
    unexpected = [c for c in counts if c not in expected]
    if unexpected:
        problems.append(f"unexpected folders: {', '.join(unexpected)}")
    short = [f"{c} {counts[c]} of {n}" for c, n in expected.items() if c in counts and counts[c] != n]
    if short:
        problems.append("images: " + ", ".join(short))
    return "incomplete", "; ".join(problems)


def _write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path, workers: int, progress: bool,
                desc: str) -> list[int]:
    """Write ``<folder>/<class>/<NNNN>.png`` for every image (numbered per class, in
    source order); returns the images per class."""
    counts = np.bincount(labels, minlength=len(CIFAR10_CLASSES))
    width = max(4, len(str(max(int(counts.max()) - 1, 0))))
    index = np.zeros(len(labels), dtype=np.int64)
    for c in range(len(CIFAR10_CLASSES)):
        rows = np.flatnonzero(labels == c)
        index[rows] = np.arange(len(rows))
        (folder / CIFAR10_CLASSES[c]).mkdir()
    dirs = [str(folder / c) for c in CIFAR10_CLASSES]

    def write(rows: range) -> int:
        for i in rows:
            path = os.path.join(dirs[labels[i]], f"{index[i]:0{width}d}.png")
            Image.fromarray(images[i]).save(path, format="PNG")
        return len(rows)

    chunk = 256
    chunks = [range(lo, min(lo + chunk, len(labels))) for lo in range(0, len(labels), chunk)]
    with _bar(len(labels), desc, progress, "img") as bar:
        if workers <= 1:
            for rows in chunks:
                bar.update(write(rows))
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for n in pool.map(write, chunks):
                    bar.update(n)
            finally:  # on an error or Ctrl-C, drop the chunks not started yet
                pool.shutdown(wait=True, cancel_futures=True)
    return [int(n) for n in counts]


def _check_splits(splits: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str):
        splits = ("train", "test") if splits == "both" else (splits,)
    return unique_choices((_split(s) for s in splits), "no CIFAR-10 split asked for: choose train, test or both")


def _split(s: str) -> str:
    if s not in CIFAR10_SPLIT_FILES:
        raise ValueError(f"unknown CIFAR-10 split {s!r}: choose train, test or both")
    return s


def prepare_cifar10(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    splits: str | Sequence[str] = ("train", "test"),
    verify: bool = True,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Path]:
    """Write CIFAR-10 as ``<root>/data/cifar10/<split>/<class>/<NNNN>.png``.

    Args:
        root: the folder to write under (a ``$TTA_HOME``); default :func:`tta.paths.tta_home`.
        source: ``cifar-10-python.tar.gz`` (read straight from the archive) or its
            extracted ``cifar-10-batches-py`` folder; ``None`` downloads the archive
            (torchvision) into ``<root>/downloads``.
        splits: ``"train"``, ``"test"``, ``"both"`` or a sequence of splits.
        verify: check the published md5s of the archive and of each batch file, and
            refuse a file that does not match (``False``: a modified copy).
        force: replace a split folder that exists (complete or not); otherwise a
            complete one is left as it is and an incomplete one is an error.
        workers: threads writing the PNG files (default: 2 when the machine has
            more than one core).
        progress: show tqdm progress bars (on stderr).
        log: where the messages go.

    Returns:
        ``{split: absolute path of the split folder}`` for every split asked for.

    Raises:
        ChecksumError: a file does not match its published checksum.
        FileExistsError: a split folder exists but is incomplete (and not ``force``).
        FileNotFoundError / ValueError: ``source`` is not the CIFAR-10 python archive.
        RuntimeError: the download failed (the message says how to do it offline).
    """
    root = _home(root)
    splits = _check_splits(splits)
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    targets = {s: root / "data" / "cifar10" / s for s in splits}
    todo = []
    for split, target in targets.items():
        state, detail = _split_state(target, split)
        if state == "complete" and not force:
            log(f"{target} already holds a complete CIFAR-10 {split} split ({detail}): nothing to do "
                "(--force rewrites it)")
        elif state == "incomplete" and not force:
            raise FileExistsError(
                f"{target} exists but is not a complete CIFAR-10 {split} split ({detail}): "
                "remove it, pass --force (force=True) to replace it, or choose another --root"
            )
        else:
            todo.append(split)
    if not todo:
        return targets
    downloaded = source is None
    if source is None:
        source = _download_cifar10(root / "downloads" / "cifar10", log)
    source = _abs(source)
    names = [CIFAR10_META] + [n for s in todo for n in CIFAR10_SPLIT_FILES[s]]
    files = _read_cifar10_source(source, names, verify, progress, log)
    _decode_classes(files[CIFAR10_META][1], files[CIFAR10_META][0])
    for split in todo:
        target = targets[split]
        parts = []
        for name in CIFAR10_SPLIT_FILES[split]:
            where, raw = files.pop(name)  # the bytes go once decoded
            parts.append(_decode_batch(raw, where))
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        del parts
        with _temp_folder_for(target, log) as tmp:
            counts = _write_pngs(images, labels, tmp, workers, progress, f"cifar10 {split}")
            info = {"dataset": "cifar10", "split": split, "format": "png", "classes": list(CIFAR10_CLASSES),
                    "counts": counts, "source": str(source), "verified": bool(verify)}
            (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
            _move_into_place(tmp, target)
        log(f"wrote {len(labels)} CIFAR-10 {split} images to {target}")
    if downloaded:
        log(f"the download stays in {source.parent} (about 340 MiB with the extracted copy): delete it "
            "once done, or keep it for later runs")
    return targets


def cifar10_next_step(targets: dict[str, Path]) -> str:
    """The command lines that make tta-bench read the CIFAR-10 folders ``targets``."""
    roots = {p.parent.parent.parent for p in targets.values()}
    keys = []
    if "test" in targets:
        keys.append(bench_arg("data.root", targets["test"]))
    if "train" in targets:
        keys.append(bench_arg("data.source_root", targets["train"]))
    explicit = f"tta-bench data=cifar10c {' '.join(keys)}"
    root = roots.pop() if len(roots) == 1 else None
    if root is not None and root == _home_or_none():
        return (f"Next step:\n  tta-bench data=cifar10c    # reads them from $TTA_HOME ({root}): nothing to set\n"
                f"(the same, spelled out: {explicit})")
    lines = ["Next step, either:"]
    if root is not None:
        lines += [f"  export TTA_HOME={shlex.quote(str(root))}", "  tta-bench data=cifar10c",
                  "or, leaving TTA_HOME as it is:"]
    lines.append(f"  {explicit}")
    return "\n".join(lines)
