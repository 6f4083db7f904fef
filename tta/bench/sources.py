"""Data sources of the benchmark: which images make up each domain.

A source turns the ``data`` config plus the scenario's severity schedule into a list
of :class:`Domain` segments. Each segment names a pool of images (:mod:`.pools`),
the rows of the pool it uses, their labels, and whether the corruption is rendered
on the fly (``kind: on_the_fly``, by :mod:`.render`) or already baked into the
images (``npy``, ``imagenet_c``).
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import imagenet_wnids, list_image_folder
from ..data.cifar10c import images_npy_problem, labels_npy_problem
from .files import bad_files_error, pick_files, seeded_subset
from .pools import ArrayPool, FilePool, ImagePool
from .settings import DataConfig, ScenarioConfig

log = logging.getLogger("tta.bench")

__all__ = ["Domain", "build_domains", "domain_names"]

_IMAGENET_C_LAYOUT = "<root>/<corruption>/<severity>/<wnid>/*.JPEG (e.g. <root>/fog/5/n01440764/ILSVRC2012_val_00000293.JPEG)"
_NPY_LAYOUT = (
    "<root>/<corruption>.npy (uint8, (5 * N, 32, 32, 3): severities 1-5 stacked, N images each) "
    "and <root>/labels.npy ((5 * N,) class indices)"
)


@dataclass
class Domain:
    """One segment of the stream: images ``rows`` of ``pool`` with ``labels``,
    showing ``corruption`` at ``severity`` (rendered on the fly when ``render``).
    ``image_ids`` name each row's image in its source (its index in the sorted
    file listing), stable across subsets, scenarios and stream orders: a
    rendered image's corruption noise is seeded from it."""

    name: str
    corruption: str
    severity: int
    pool: ImagePool
    rows: np.ndarray
    labels: np.ndarray
    render: bool
    image_ids: np.ndarray | None = None
    #: What the labels index, for errors: the class folders found (see _classes_note).
    classes_note: str = ""

    def __len__(self) -> int:
        return len(self.rows)


def domain_names(corruptions: Sequence[str], severities: Sequence[int]) -> list[tuple[str, str, int]]:
    """``(name, corruption, severity)`` of each segment, corruption-major. Names are
    the corruption alone when every segment has the same severity, else
    ``<corruption>/<severity>``."""
    single = len(set(severities)) == 1
    return [
        (c if single else f"{c}/{s}", c, int(s)) for c in corruptions for s in severities
    ]


def _class_indices(classes: Sequence[str], mode: str, where: Path) -> tuple[list[int], int, str]:
    """Label of each class folder, the number of classes of the label space and
    the class_index that gave them (``auto`` resolved to ``folder`` or ``imagenet``)."""
    wnids = imagenet_wnids()
    if mode == "auto":
        mode = "imagenet" if classes and all(c in wnids for c in classes) else "folder"
    if mode == "folder":
        return list(range(len(classes))), len(classes), mode
    if mode == "imagenet":
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(
                f"{where}: class folders {unknown[:5]} are not ImageNet-1k wnids; use "
                "data.class_index=folder to number the folders in sorted order instead"
            )
        return [index[c] for c in classes], len(wnids), mode
    raise ValueError(f"data.class_index must be folder, imagenet or auto, got {mode!r}")


def _classes_note(classes: Sequence[str], mode: str, where: Path) -> str:
    """The label space in words, for an error that refuses it (a class count that
    does not match the model's): with class_index=folder, the folders found."""
    if mode == "imagenet":
        return "the 1000 ImageNet-1k classes, data.class_index=imagenet"
    shown = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
    return (f"the class folders of {where}: {shown}; move out the folders that are not classes, "
            "hidden folders, __MACOSX and @eaDir aside, which never count")


def _different_class_folders(folder: Path, classes: Sequence[str], first: Path,
                             first_classes: Sequence[str]) -> ValueError:
    only_first = sorted(set(first_classes) - set(classes))
    only_here = sorted(set(classes) - set(first_classes))
    return ValueError(
        f"{folder} does not hold the class folders of {first}: data.class_index=folder numbers each domain's "
        "sorted class folders, so a class spelled differently, missing or added in one domain would shift "
        f"the labels of others there. Only in {first}: {only_first or 'none'}; only in {folder}: "
        f"{only_here or 'none'}. Give every domain the same class folders (rename, add or remove these)"
    )


def _check_corruptions(corruptions: Sequence[str]) -> list[str]:
    from .. import corruptions as tc

    names = [str(c) for c in corruptions]
    unknown = [c for c in names if c not in tc.ALL_NAMES]
    if unknown:
        raise ValueError(
            f"unknown corruption(s) {unknown} in data.corruptions; tta.corruptions renders: "
            f"{', '.join(tc.ALL_NAMES)}"
        )
    return names


def _target_size(data: DataConfig, input_size: Sequence[int] | None) -> int | None:
    size = data.image_size
    if size is None and input_size is not None:
        h, w = input_size
        if h != w:
            raise ValueError(f"model input size {tuple(input_size)} is not square: set data.image_size")
        size = h
    return size


def build_domains(
    data: DataConfig,
    scenario: ScenarioConfig,
    *,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[list[Domain], int | None]:
    """The stream's segments for the ``data`` and ``scenario`` configs (each
    corruption at each severity of ``scenario.severities``, else at
    ``data.severity``), and the number of classes of the label space (None when
    the source cannot tell).

    Raises ``FileNotFoundError`` naming the expected layout when data is missing.
    """
    root = Path(os.path.expanduser(data.root))
    segments = domain_names(data.corruptions, scenario.severities or [data.severity])
    if data.kind == "on_the_fly":
        domains, num_classes = _on_the_fly(data, root, segments, input_size, seed)
    elif data.kind == "npy":
        domains, num_classes = _npy(root, segments, data.num_images, seed)
    else:
        domains, num_classes = _imagenet_c(data, root, segments, input_size, seed)
    if data.num_images is not None and min(len(d) for d in domains) < data.num_images:
        sizes = sorted({len(d) for d in domains})
        fewest = min(domains, key=len)
        log.warning("data.num_images=%d, but the data has fewer: running %s images per domain (%s under %s)",
                    data.num_images, sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}",
                    f"{len(fewest)} for {fewest.name}", root)
    return domains, num_classes


def _on_the_fly(data: DataConfig, root: Path, segments, input_size, seed: int):
    _check_corruptions([c for _, c, _ in segments])
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} does not exist: expected clean images in an ImageFolder layout "
            "<root>/<class>/<image> (for cifar10c: $TTA_HOME/data/cifar10/test; `tta-data cifar10` writes it)"
        )
    files, folder_labels, classes = list_image_folder(root)
    class_labels, num_classes, mode = _class_indices(classes, data.class_index, root)
    rows, bad = pick_files(files, data.num_images, seed, skip_bad=data.skip_bad_files,
                           where=f"data.root {root}", num_workers=data.num_workers)
    if bad and not data.skip_bad_files:
        raise bad_files_error(bad, f"data.root {root}")
    pool = FilePool([files[r] for r in rows], _target_size(data, input_size), data.crop_ratio,
                    key=f"folder:{root}", bad_files=bad)
    labels = np.array([class_labels[folder_labels[r]] for r in rows], dtype=np.int64)
    local = np.arange(len(rows))
    note = _classes_note(classes, mode, root)
    domains = [Domain(n, c, s, pool, local, labels, render=True, image_ids=rows, classes_note=note)
               for n, c, s in segments]
    return domains, num_classes


def _npy(root: Path, segments, num_images: int | None, seed: int):
    label_path = root / "labels.npy"
    if not label_path.is_file():
        raise FileNotFoundError(f"{label_path} not found: expected the CIFAR-10-C layout {_NPY_LAYOUT} "
                                "(`tta-data cifar10-c` says where to get it and checks a copy)")
    all_labels = _load_npy(label_path)
    # the check tta-data cifar10-c makes, but for any number of classes (CIFAR-100-C):
    # the model's class count bounds the labels later (stream.open_stream)
    problem = labels_npy_problem(all_labels, num_classes=None)
    if problem:
        raise ValueError(f"{label_path} {problem}. data=cifar10c_disk reads the CIFAR-10-C layout {_NPY_LAYOUT} "
                         f"(`tta-data cifar10-c --source {shlex.quote(str(root))}` checks a copy)")
    pools: dict[str, ArrayPool] = {}
    domains = []
    for name, corruption, severity in segments:
        if corruption not in pools:
            pools[corruption] = _array_pool(root, corruption, len(all_labels))
        pool = pools[corruption]
        per_severity = len(pool) // 5
        rows = (severity - 1) * per_severity + seeded_subset(per_severity, num_images, seed)
        labels = np.asarray(all_labels[rows], dtype=np.int64)
        domains.append(Domain(name, corruption, severity, pool, rows, labels, render=False))
    return domains, None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy file ({err}): expected the CIFAR-10-C layout "
                         f"{_NPY_LAYOUT}") from err


def _array_pool(root: Path, corruption: str, num_labels: int) -> ArrayPool:
    """``<root>/<corruption>.npy``, its shape checked against the published layout."""
    path = root / f"{corruption}.npy"
    if not path.is_file():
        present = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
        raise FileNotFoundError(
            f"{path} not found: expected the CIFAR-10-C layout {_NPY_LAYOUT}; "
            f"corruptions present: {present or 'none'}"
        )
    # the check tta-data cifar10-c makes, but for any image size (not only CIFAR's)
    problem = images_npy_problem(_load_npy(path), size=None)
    if problem:
        raise ValueError(f"{path} {problem}")
    pool = ArrayPool(path)
    arr = pool.array
    if arr.shape[0] != num_labels:
        raise ValueError(f"{path} has {arr.shape[0]} images but {root / 'labels.npy'} {num_labels} labels")
    return pool


def _imagenet_c(data: DataConfig, root: Path, segments, input_size, seed: int):
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist: expected the ImageNet-C layout {_IMAGENET_C_LAYOUT} "
                                "(`tta-data imagenet-c` says where to get it and checks a copy)")
    size = _target_size(data, input_size)
    domains, all_bad = [], []
    num_classes: int | None = None
    first: tuple[Path, list[str], str] | None = None  # the first domain's folder, class folders, class_index
    for name, corruption, severity in segments:
        folder = root / corruption / str(severity)
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"{folder} not found: expected the ImageNet-C layout {_IMAGENET_C_LAYOUT}; "
                f"corruption folders present: {present or 'none'}"
            )
        try:
            files, folder_labels, classes = list_image_folder(folder)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; expected the ImageNet-C layout {_IMAGENET_C_LAYOUT}") from None
        class_labels, num_classes, mode = _class_indices(classes, data.class_index, folder)
        # Wnid folders are labelled by name, so domains may hold different subsets;
        # folder-numbered ones must be the same folders in every domain (which also
        # makes every domain's class count the same).
        if first is None:
            first = (folder, classes, mode)
        elif "folder" in (mode, first[2]) and classes != first[1]:
            raise _different_class_folders(folder, classes, first[0], first[1])
        labels = np.asarray(class_labels, dtype=np.int64)[np.asarray(folder_labels, dtype=np.int64)]
        rows, bad = pick_files(files, data.num_images, seed, skip_bad=data.skip_bad_files, where=str(folder),
                               num_workers=data.num_workers)
        all_bad += bad
        pool = FilePool([files[r] for r in rows], size, data.crop_ratio, key=f"imagenet_c:{folder}", bad_files=bad)
        domains.append(Domain(name, corruption, severity, pool, np.arange(len(rows)),
                              labels[rows], render=False, classes_note=_classes_note(classes, mode, folder)))
    if all_bad and not data.skip_bad_files:
        # Every domain is checked first, so the error lists all of them at once.
        raise bad_files_error(all_bad, f"data.root {root}")
    return domains, num_classes
