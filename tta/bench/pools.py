"""Image pools: images addressable by row (files decoded on demand, or rows of a
uint8 array), and decoding many rows at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .files import decode_image

__all__ = ["ImagePool", "ArrayPool", "FilePool", "decode_all"]


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


def decode_all(pool: ImagePool, rows: np.ndarray, num_workers: int = 0) -> Tensor:
    """Images ``rows`` of ``pool`` as one uint8 (N, 3, H, W) tensor, decoded by
    ``num_workers`` threads when the pool reads files."""
    if len(rows) == 0:
        raise ValueError("no images to decode")
    if not hasattr(pool, "files") or num_workers <= 0 or len(rows) < 256:
        return pool.read_many(rows)
    # Threads, not processes: Pillow decodes without the GIL, and a runner that is
    # itself a joblib (loky) worker cannot start DataLoader processes the usual way.
    from concurrent.futures import ThreadPoolExecutor

    first = pool.read(int(rows[0]))
    out = torch.empty((len(rows), *first.shape), dtype=torch.uint8)
    out[0] = first

    def fill(chunk: np.ndarray) -> None:
        for i in chunk:
            out[i] = pool.read(int(rows[i]))

    with ThreadPoolExecutor(max_workers=num_workers) as ex:
        list(ex.map(fill, np.array_split(np.arange(1, len(rows)), num_workers * 8)))
    return out
