"""Data sources of the benchmark: which images make up each domain, and how to read them.

A source turns a ``data`` config plus the scenario's severity schedule into a list of
:class:`Domain` segments. Each segment names a pool of images (files decoded on
demand, or a uint8 array), the rows of the pool it uses, their labels, and whether
the corruption is rendered on the fly (``kind: on_the_fly``) or already baked into
the images (``npy``, ``imagenet_c``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data import list_image_folder

__all__ = [
    "Domain",
    "ImagePool",
    "ArrayPool",
    "FilePool",
    "imagenet_wnids",
    "decode_image",
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


def decode_image(path: str | os.PathLike, size: int | None = None, crop_ratio: float = 1.0) -> Tensor:
    """Decode an image file to uint8 RGB (3, H, W). With ``size``, the shorter side
    is resized (bilinear, antialiased) to ``round(size / crop_ratio)`` and the centre
    ``size x size`` is kept; images already of that size are left untouched."""
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
    """Image files decoded on demand (see :func:`decode_image` for ``size``)."""

    def __init__(self, files: Sequence[Path], size: int | None, crop_ratio: float, key: str) -> None:
        self.files = [Path(f) for f in files]
        self.size, self.crop_ratio, self.key = size, crop_ratio, key

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
    showing ``corruption`` at ``severity`` (rendered on the fly when ``render``)."""

    name: str
    corruption: str
    severity: int
    pool: ImagePool
    rows: np.ndarray
    labels: np.ndarray
    render: bool

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
        return _on_the_fly(data, root, segments, num_images, input_size, seed)
    if kind == "npy":
        return _npy(root, segments, num_images, seed)
    return _imagenet_c(data, root, segments, num_images, input_size, seed)


def _on_the_fly(data, root, segments, num_images, input_size, seed):
    _check_corruptions([c for _, c, _ in segments])
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root {root} does not exist: expected clean images in an ImageFolder layout "
            "<root>/<class>/<image> (for cifar10c: $TTA_HOME/data/cifar10/test)"
        )
    files, folder_labels, classes = list_image_folder(root)
    class_labels, num_classes = _class_indices(classes, str(data.get("class_index", "folder")), root)
    rows = _subset(len(files), num_images, seed)
    pool = FilePool([files[r] for r in rows], _target_size(data, input_size),
                    float(data.get("crop_ratio", 1.0)), key=f"folder:{root}")
    labels = np.array([class_labels[folder_labels[r]] for r in rows], dtype=np.int64)
    local = np.arange(len(rows))
    domains = [Domain(n, c, s, pool, local, labels, render=True) for n, c, s in segments]
    return domains, num_classes


def _npy(root, segments, num_images, seed):
    label_path = root / "labels.npy"
    if not label_path.is_file():
        raise FileNotFoundError(f"{label_path} not found: expected the CIFAR-10-C layout {_NPY_LAYOUT}")
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
        raise FileNotFoundError(f"data.root {root} does not exist: expected the ImageNet-C layout {_IMAGENET_C_LAYOUT}")
    size = _target_size(data, input_size)
    crop = float(data.get("crop_ratio", 1.0))
    mode = str(data.get("class_index", "imagenet"))
    domains = []
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
        rows = _subset(len(files), num_images, seed)
        pool = FilePool([files[r] for r in rows], size, crop, key=f"imagenet_c:{folder}")
        domains.append(Domain(name, corruption, severity, pool, np.arange(len(rows)),
                              labels[rows], render=False))
    return domains, num_classes


def load_source_images(
    root: str | os.PathLike, num_images: int, *, size: int | None, crop_ratio: float = 1.0,
    seed: int = 0, num_workers: int = 0,
) -> Tensor:
    """A seeded random subset of clean images from an ImageFolder, as uint8
    (N, 3, H, W): the source data of methods like EATA."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(
            f"source images not found at {root}: expected an ImageFolder <root>/<class>/<image> "
            "of clean training images (data.source_root)"
        )
    files, _, _ = list_image_folder(root)
    rows = _subset(len(files), num_images, seed + 1)
    from .stream import decode_all

    return decode_all(FilePool([files[r] for r in rows], size, crop_ratio, key=f"source:{root}"),
                      np.arange(len(rows)), num_workers)
