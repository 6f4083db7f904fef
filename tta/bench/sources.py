"""Data sources of the benchmark: which images make up each domain, and how to read them.

A source turns a ``data`` config plus the scenario's severity schedule into a list of
:class:`Domain` segments. Each segment names a pool of images (files decoded on
demand, or a uint8 array), the rows of the pool it uses, their labels, and whether
the corruption is rendered on the fly (``kind: on_the_fly``) or already baked into
the images (``npy``, ``imagenet_c``).
"""

from __future__ import annotations

import logging
import os
import stat as stat_mod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data import list_image_folder

log = logging.getLogger("tta.bench")

__all__ = [
    "Domain",
    "ImagePool",
    "ArrayPool",
    "FilePool",
    "imagenet_wnids",
    "decode_image",
    "ImageFileError",
    "check_image_file",
    "check_image_files",
    "bad_files_error",
    "build_domains",
    "domain_names",
    "load_source_images",
    "KINDS",
]

KINDS = ("on_the_fly", "npy", "imagenet_c")

_IMAGENET_C_LAYOUT = "<root>/<corruption>/<severity>/<wnid>/*.JPEG (e.g. <root>/fog/5/n01440764/ILSVRC2012_val_00000293.JPEG)"
_NPY_LAYOUT = (
    "<root>/<corruption>.npy (uint8, (5 * N, 32, 32, 3): severities 1-5 stacked, N images each) "
    "and <root>/labels.npy ((5 * N,) class indices)"
)


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted wnids, the
    order of torchvision/timm ImageNet classifiers), shipped with tta.bench."""
    path = Path(__file__).with_name("imagenet_wnids.txt")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"{path} is damaged: expected 1000 wnids, found {len(wnids)}")
    return wnids


# ----------------------------------------------------------------------------------
# Image pools
# ----------------------------------------------------------------------------------


class ImageFileError(OSError):
    """Image files the benchmark cannot read; the message names every one."""


#: Bytes read from the end of a file for the trailer check (JPEG EOI, PNG IEND),
#: enough to see past the padding some writers append.
_TAIL_BYTES = 4096
#: Bytes a writer may leave after a JPEG's end-of-image marker or a PNG's IEND.
_PADDING = b"\x00\xff\r\n\t "
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it looks readable.

    A cheap check that decodes nothing: the path is a regular file (not a folder,
    not a broken symlink) and not empty; JPEG and PNG files start with their magic
    bytes and end with their end marker (FFD9, IEND; padding may follow), which
    catches truncated files; other files must have a header Pillow recognises,
    and WebP and BMP files be at least as long as their header says.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return f"is a broken symlink (its target {os.readlink(path)} does not exist)"
        return "does not exist"
    except OSError as err:
        return f"cannot stat ({err.strerror or err})"
    if stat_mod.S_ISDIR(st.st_mode):
        return "is a directory, not an image file"
    if not stat_mod.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, st.st_size - _TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    # JPEG and PNG (nearly every data set) are told by their magic and trailer;
    # anything else is identified by Pillow, which reads its header only. A file
    # without its end marker is decoded before it is called truncated: some
    # writers append data after it (e.g. phone cameras), and those decode fine.
    if head.startswith(_JPEG_MAGIC):
        if not _ends_with(tail, b"\xff\xd9") and not _decodes(path):
            return "is a truncated JPEG (it does not end with the end-of-image marker FFD9, and does not decode)"
        return None
    if head.startswith(_PNG_MAGIC):
        if not _ends_with(tail, _PNG_IEND) and not _decodes(path):
            return "is a truncated PNG (it does not end with an IEND chunk, and does not decode)"
        return None
    try:
        with Image.open(path) as img:
            fmt = img.format
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, or assorted errors on damaged headers
        return f"is not an image Pillow can read (it starts with bytes {head[:8].hex()}; {type(err).__name__}: {err})"
    if fmt == "WEBP" and head[:4] == b"RIFF":
        declared = int.from_bytes(head[4:8], "little") + 8
        if st.st_size < declared:
            return f"is a truncated WebP ({st.st_size} bytes, its header says {declared})"
    elif fmt == "BMP" and head[:2] == b"BM":
        declared = int.from_bytes(head[2:6], "little")
        if st.st_size < declared:
            return f"is a truncated BMP ({st.st_size} bytes, its header says {declared})"
    return None


def _ends_with(tail: bytes, marker: bytes) -> bool:
    """``tail`` ends with ``marker``, possibly followed by padding bytes. (In a
    JPEG's entropy-coded data FF is always followed by 00 or a restart marker, so
    FFD9 there can only be the end of an image.)"""
    i = tail.rfind(marker)
    return i >= 0 and not tail[i + len(marker):].strip(_PADDING)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decoding error means: unreadable
        return False
    return True


def check_image_files(files: Sequence[Path], num_workers: int = 0) -> list[str | None]:
    """:func:`check_image_file` of each file, in order (``num_workers`` threads
    for long lists: the check waits on the file system, not the CPU)."""
    if num_workers <= 1 or len(files) < 1024:
        return [check_image_file(f) for f in files]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=num_workers) as ex:
        return list(ex.map(check_image_file, files, chunksize=64))


def decode_image(path: str | os.PathLike, size: int | None = None, crop_ratio: float = 1.0) -> Tensor:
    """Decode an image file to uint8 RGB (3, H, W). With ``size``, the shorter side
    is resized (bilinear, antialiased) to ``round(size / crop_ratio)`` and the centre
    ``size x size`` is kept; images already of that size are left untouched.

    Raises :class:`ImageFileError` naming ``path`` when the file cannot be decoded.
    """
    try:
        return _decode_image(path, size, crop_ratio)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises assorted errors on damaged files
        raise ImageFileError(
            f"cannot decode image file {path} ({type(err).__name__}: {err}); replace or remove it "
            "(tta-bench checks the files a run uses before streaming, and data.skip_bad_files=true "
            "leaves out the ones that fail that check)"
        ) from err


def _decode_image(path: str | os.PathLike, size: int | None, crop_ratio: float) -> Tensor:
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            short = max(size, round(size / crop_ratio))
            w, h = img.size
            scale = short / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ImagePool:
    """Images addressable by row; subclasses read files or arrays."""

    #: identity of the pool (for sharing decoded rows between domains)
    key: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, row: int) -> Tensor:
        """Image ``row`` as uint8 (3, H, W)."""
        raise NotImplementedError

    def read_many(self, rows: np.ndarray) -> Tensor:
        """Images ``rows`` as uint8 (N, 3, H, W)."""
        return torch.stack([self.read(int(r)) for r in rows])

    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the images (every image of a pool has the same shape)."""
        return tuple(self.read(0).shape)  # type: ignore[return-value]


class ArrayPool(ImagePool):
    """Rows of a uint8 NHWC ``.npy`` file, memory-mapped lazily (so the pool pickles
    into DataLoader workers as a path, not as the array)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.key = f"npy:{self.path}"
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, row: int) -> Tensor:
        return torch.from_numpy(np.array(self.array[row])).permute(2, 0, 1)

    def read_many(self, rows: np.ndarray) -> Tensor:
        # Sorted reads walk the memory map forward; the result is put back in order.
        order = np.argsort(rows, kind="stable")
        data = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        data[order] = self.array[np.asarray(rows)[order]]
        return torch.from_numpy(data).permute(0, 3, 1, 2)

    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.array.shape
        return (c, h, w)


class FilePool(ImagePool):
    """Image files decoded on demand (see :func:`decode_image` for ``size``).
    ``bad_files`` lists ``(path, reason)`` of the files left out of it when it was
    picked (``data.skip_bad_files``)."""

    def __init__(self, files: Sequence[Path], size: int | None, crop_ratio: float, key: str,
                 bad_files: Sequence[tuple[str, str]] = ()) -> None:
        self.files = [Path(f) for f in files]
        self.size, self.crop_ratio, self.key = size, crop_ratio, key
        self.bad_files = list(bad_files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, row: int) -> Tensor:
        return decode_image(self.files[row], self.size, self.crop_ratio)

    def image_shape(self) -> tuple[int, int, int]:
        if self.size is not None:
            return (3, self.size, self.size)
        return super().image_shape()


# ----------------------------------------------------------------------------------
# Domains
# ----------------------------------------------------------------------------------


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


def _subset(n: int, num_images: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of ``range(n)``: the same seed and ``n`` give the same
    images, so every domain of a source (and every method) sees the same ones."""
    perm = np.random.default_rng([seed, 0]).permutation(n)
    return perm if num_images is None else perm[: int(num_images)]


def _pick_files(files: Sequence[Path], num_images: int | None, seed: int, *, skip_bad: bool,
                where: str, num_workers: int = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The seeded subset of :func:`_subset`, with each file checked first
    (:func:`check_image_file`): the rows of the readable files and ``(path,
    reason)`` of the others. Only the files the run uses are checked; with
    ``skip_bad``, each bad file is replaced by the next one of the seeded order
    (so the subset keeps its size, and is the usual one when no file is bad)."""
    order = _subset(len(files), None, seed)
    want = len(order) if num_images is None else min(int(num_images), len(order))
    picked: list[int] = []
    bad: list[tuple[str, str]] = []
    start = 0
    while len(picked) < want and start < len(order):
        chunk = order[start: start + want - len(picked)]
        start += len(chunk)
        for row, reason in zip(chunk, check_image_files([files[r] for r in chunk], num_workers)):
            if reason is None:
                picked.append(int(row))
            else:
                bad.append((str(files[row]), reason))
        if bad and not skip_bad:
            break
    if skip_bad and bad and not picked:
        raise bad_files_error(bad, where, none_left=True)
    return np.asarray(picked, dtype=np.int64), bad


def bad_files_error(bad: Sequence[tuple[str, str]], where: str, none_left: bool = False) -> ImageFileError:
    """The error of a run refused for bad image files: every path and why."""
    lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if none_left:
        return ImageFileError(f"none of the image files under {where} can be read:\n{lines}")
    return ImageFileError(
        f"{len(bad)} image file(s) this run would use under {where} cannot be read:\n{lines}\n"
        "Replace or remove them, or set data.skip_bad_files=true to leave them out (each is then "
        "replaced by another image of the folder, and results.json lists them under bad_files)"
    )


def _class_indices(classes: Sequence[str], mode: str, where: Path) -> tuple[list[int], int]:
    """Label of each class folder and the number of classes of the label space."""
    wnids = imagenet_wnids()
    if mode == "auto":
        mode = "imagenet" if classes and all(c in wnids for c in classes) else "folder"
    if mode == "folder":
        return list(range(len(classes))), len(classes)
    if mode == "imagenet":
        index = {w: i for i, w in enumerate(wnids)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise ValueError(
                f"{where}: class folders {unknown[:5]} are not ImageNet-1k wnids; use "
                "data.class_index=folder to number the folders in sorted order instead"
            )
        return [index[c] for c in classes], len(wnids)
    raise ValueError(f"data.class_index must be folder, imagenet or auto, got {mode!r}")


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


def _severities(data: Mapping[str, Any], scenario: Mapping[str, Any]) -> list[int]:
    sev = scenario.get("severities")
    sev = [int(s) for s in sev] if sev else [int(data["severity"])]
    bad = [s for s in sev if not 1 <= s <= 5]
    if bad:
        raise ValueError(f"severities must be in 1..5, got {bad}")
    return sev


def _target_size(data: Mapping[str, Any], input_size: Sequence[int] | None) -> int | None:
    size = data.get("image_size")
    if size is None and input_size is not None:
        h, w = input_size
        if h != w:
            raise ValueError(f"model input size {tuple(input_size)} is not square: set data.image_size")
        size = h
    return None if size is None else int(size)


def build_domains(
    data: Mapping[str, Any],
    scenario: Mapping[str, Any],
    *,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[list[Domain], int | None]:
    """The stream's segments for a ``data`` config and a ``scenario`` config, and
    the number of classes of the label space (None when the source cannot tell).

    Raises ``FileNotFoundError`` naming the expected layout when data is missing.
    """
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"data.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not data.get("corruptions"):
        raise ValueError("data.corruptions is empty: name at least one corruption")
    root = Path(os.path.expanduser(str(data["root"])))
    severities = _severities(data, scenario)
    segments = domain_names([str(c) for c in data["corruptions"]], severities)
    num_images = data.get("num_images")
    if num_images is not None and int(num_images) < 1:
        raise ValueError(f"data.num_images must be >= 1 or null, got {num_images}")
    if kind == "on_the_fly":
        domains, num_classes = _on_the_fly(data, root, segments, num_images, input_size, seed)
    elif kind == "npy":
        domains, num_classes = _npy(root, segments, num_images, seed)
    else:
        domains, num_classes = _imagenet_c(data, root, segments, num_images, input_size, seed)
    if num_images is not None and min(len(d) for d in domains) < int(num_images):
        sizes = sorted({len(d) for d in domains})
        fewest = min(domains, key=len)
        log.warning("data.num_images=%d, but the data has fewer: running %s images per domain (%s under %s)",
                    int(num_images), sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}",
                    f"{len(fewest)} for {fewest.name}", root)
    return domains, num_classes


def _file_check_options(data: Mapping[str, Any]) -> tuple[bool, int]:
    return bool(data.get("skip_bad_files", False)), int(data.get("num_workers") or 0)


def _on_the_fly(data, root, segments, num_images, input_size, seed):
    _check_corruptions([c for _, c, _ in segments])
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} does not exist: expected clean images in an ImageFolder layout "
            "<root>/<class>/<image> (for cifar10c: $TTA_HOME/data/cifar10/test; `tta-data cifar10` writes it)"
        )
    files, folder_labels, classes = list_image_folder(root)
    class_labels, num_classes = _class_indices(classes, str(data.get("class_index", "folder")), root)
    skip, workers = _file_check_options(data)
    rows, bad = _pick_files(files, num_images, seed, skip_bad=skip, where=f"data.root {root}",
                            num_workers=workers)
    if bad and not skip:
        raise bad_files_error(bad, f"data.root {root}")
    pool = FilePool([files[r] for r in rows], _target_size(data, input_size),
                    float(data.get("crop_ratio", 1.0)), key=f"folder:{root}", bad_files=bad)
    labels = np.array([class_labels[folder_labels[r]] for r in rows], dtype=np.int64)
    local = np.arange(len(rows))
    domains = [Domain(n, c, s, pool, local, labels, render=True, image_ids=rows) for n, c, s in segments]
    return domains, num_classes


def _npy(root, segments, num_images, seed):
    label_path = root / "labels.npy"
    if not label_path.is_file():
        raise FileNotFoundError(f"{label_path} not found: expected the CIFAR-10-C layout {_NPY_LAYOUT} "
                                "(`tta-data cifar10-c` says where to get it and checks a copy)")
    all_labels = np.load(label_path, mmap_mode="r")
    pools: dict[str, ArrayPool] = {}
    domains = []
    for name, corruption, severity in segments:
        if corruption not in pools:
            path = root / f"{corruption}.npy"
            if not path.is_file():
                present = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
                raise FileNotFoundError(
                    f"{path} not found: expected the CIFAR-10-C layout {_NPY_LAYOUT}; "
                    f"corruptions present: {present or 'none'}"
                )
            pool = ArrayPool(path)
            arr = pool.array
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or arr.shape[0] % 5:
                raise ValueError(
                    f"{path} holds {arr.dtype} {arr.shape}: expected uint8 (5 * N, H, W, 3), "
                    "severities 1-5 stacked"
                )
            if arr.shape[0] != all_labels.shape[0]:
                raise ValueError(
                    f"{path} has {arr.shape[0]} images but {label_path} {all_labels.shape[0]} labels"
                )
            pools[corruption] = pool
        pool = pools[corruption]
        per_severity = len(pool) // 5
        rows = (severity - 1) * per_severity + _subset(per_severity, num_images, seed)
        labels = np.asarray(all_labels[rows], dtype=np.int64)
        domains.append(Domain(name, corruption, severity, pool, rows, labels, render=False))
    return domains, None


def _imagenet_c(data, root, segments, num_images, input_size, seed):
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist: expected the ImageNet-C layout {_IMAGENET_C_LAYOUT} "
                                "(`tta-data imagenet-c` says where to get it and checks a copy)")
    size = _target_size(data, input_size)
    crop = float(data.get("crop_ratio", 1.0))
    mode = str(data.get("class_index", "imagenet"))
    skip, workers = _file_check_options(data)
    domains, all_bad = [], []
    num_classes: int | None = None
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
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no images under {folder}: expected the ImageNet-C layout {_IMAGENET_C_LAYOUT}"
            ) from None
        class_labels, n_cls = _class_indices(classes, mode, folder)
        if num_classes is not None and n_cls != num_classes:
            raise ValueError(f"{folder}: {n_cls} classes, other domains have {num_classes}")
        num_classes = n_cls
        labels = np.asarray(class_labels, dtype=np.int64)[np.asarray(folder_labels, dtype=np.int64)]
        rows, bad = _pick_files(files, num_images, seed, skip_bad=skip, where=str(folder), num_workers=workers)
        all_bad += bad
        pool = FilePool([files[r] for r in rows], size, crop, key=f"imagenet_c:{folder}", bad_files=bad)
        domains.append(Domain(name, corruption, severity, pool, np.arange(len(rows)),
                              labels[rows], render=False))
    if all_bad and not skip:
        # Every domain is checked first, so the error lists all of them at once.
        raise bad_files_error(all_bad, f"data.root {root}")
    return domains, num_classes


def load_source_images(
    root: str | os.PathLike, num_images: int, *, size: int | None, crop_ratio: float = 1.0,
    seed: int = 0, num_workers: int = 0, skip_bad_files: bool = False,
    bad_files: list[tuple[str, str]] | None = None,
) -> Tensor:
    """A seeded random subset of clean images from an ImageFolder, as uint8
    (N, 3, H, W): the source data of methods like EATA.

    The files are checked first (:func:`check_image_file`): bad ones raise
    :class:`ImageFileError` naming each, or with ``skip_bad_files`` are replaced
    by others and appended to ``bad_files`` as ``(path, reason)``."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(
            f"source images not found at {root}: expected an ImageFolder <root>/<class>/<image> "
            "of clean training images (data.source_root; for CIFAR-10, `tta-data cifar10` writes "
            "$TTA_HOME/data/cifar10/train)"
        )
    files, _, _ = list_image_folder(root)
    rows, bad = _pick_files(files, num_images, seed + 1, skip_bad=skip_bad_files,
                            where=f"data.source_root {root}", num_workers=num_workers)
    if bad and not skip_bad_files:
        raise bad_files_error(bad, f"data.source_root {root}")
    if bad_files is not None:
        bad_files.extend(bad)
    from .stream import decode_all

    return decode_all(FilePool([files[r] for r in rows], size, crop_ratio, key=f"source:{root}"),
                      np.arange(len(rows)), num_workers)
