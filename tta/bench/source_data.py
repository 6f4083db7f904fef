"""Clean source images of the data set's training split (``data.source_root``),
for methods that learn from source data: a seeded subset decoded at once (EATA's
Fisher information), or labelled batches streamed pass after pass (RMT's
prototypes, warm-up and replay; SANTA's prototypes)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, MutableMapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data import list_image_folder
from .files import bad_files_error, pick_files
from .pools import FilePool, decode_all
from .render import to_model_size
from .stream import seed_for

__all__ = ["load_source_images", "source_files", "SourceBatches", "CountedReads", "source_reading_progress"]

#: The options through which methods read source images while they set up.
SOURCE_OPTIONS = ("source_loader", "fisher_loader")


def load_source_images(
    root: str | os.PathLike, num_images: int, *, size: int | None, crop_ratio: float = 1.0,
    seed: int = 0, num_workers: int = 0, skip_bad_files: bool = False,
    bad_files: list[tuple[str, str]] | None = None,
) -> Tensor:
    """A seeded random subset of clean images from an ImageFolder, as uint8
    (N, 3, H, W): the source data of methods like EATA.

    The files are checked first (:func:`~tta.bench.files.check_image_file`): bad
    ones raise :class:`~tta.bench.files.ImageFileError` naming each, or with
    ``skip_bad_files`` are replaced by others and appended to ``bad_files`` as
    ``(path, reason)``."""
    files, _, bad = source_files(root, num_images, seed=seed, skip_bad_files=skip_bad_files,
                                 num_workers=num_workers)
    if bad_files is not None:
        bad_files.extend(bad)
    return decode_all(FilePool(files, size, crop_ratio, key=f"source:{root}"), np.arange(len(files)), num_workers)


def source_files(root: str | os.PathLike, num_images: int | None, *, seed: int, skip_bad_files: bool,
                 num_workers: int = 0) -> tuple[list[Path], np.ndarray, list[tuple[str, str]]]:
    """A seeded subset (``None``: all, in a seeded order) of the files of an
    ImageFolder of source images, each checked first
    (:func:`~tta.bench.files.check_image_file`): the readable files, their labels,
    and ``(path, reason)`` of the files left out with ``skip_bad_files`` (without
    it a bad file raises :class:`~tta.bench.files.ImageFileError` naming each)."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise FileNotFoundError(
            f"source images not found at {root}: expected an ImageFolder <root>/<class>/<image> "
            "of clean training images (data.source_root; for CIFAR-10, `tta-data cifar10` writes "
            "$TTA_HOME/data/cifar10/train)"
        )
    files, labels, _ = list_image_folder(root)
    rows, bad = pick_files(files, num_images, seed + 1, skip_bad=skip_bad_files,
                           where=f"data.source_root {root}", num_workers=num_workers)
    if bad and not skip_bad_files:
        raise bad_files_error(bad, f"data.source_root {root}")
    return [files[r] for r in rows], np.asarray(labels, dtype=np.int64)[rows], bad


class SourceBatches:
    """Labelled clean images of an ImageFolder (the data set's training split), in
    shuffled batches of float RGB in [0, 1] and labels on ``device``: the source
    data of methods that learn from it (RMT's prototypes, warm-up and replay,
    SANTA's prototypes). Iterable again and again, each pass in a new order seeded
    from ``seed`` and the pass number; decoded on the fly by ``num_workers``
    DataLoader workers, so a large split is never held in memory. The files are
    checked when it is made (see :func:`source_files`)."""

    def __init__(self, root: str | os.PathLike, batch_size: int, *, device, size: int | None,
                 crop_ratio: float = 1.0, seed: int = 0, num_workers: int = 0,
                 input_size: Sequence[int] | None = None, skip_bad_files: bool = False,
                 bad_files: list[tuple[str, str]] | None = None) -> None:
        files, self.labels, bad = source_files(root, None, seed=seed, skip_bad_files=skip_bad_files,
                                               num_workers=num_workers)
        if bad_files is not None:
            bad_files.extend(bad)
        self.pool = FilePool(files, size, crop_ratio, key=f"source:{root}")
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.num_workers, self.input_size = num_workers, input_size
        self.passes = 0

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = np.random.default_rng([self.seed, 5, self.passes]).permutation(len(self.labels))
        self.passes += 1
        batches = [order[i: i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        loader = DataLoader(_LabelledRows(self.pool, self.labels), batch_sampler=batches,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(
                                seed_for(self.seed, 6, self.passes)))
        for x, y in loader:
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield to_model_size(x, self.input_size), y.to(self.device, non_blocking=True)


class _LabelledRows(Dataset):
    def __init__(self, pool: FilePool, labels: np.ndarray) -> None:
        self.pool, self.labels = pool, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, row: int):
        return self.pool.read(int(row)), int(self.labels[row])


class CountedReads:
    """``loader`` itself, batch for batch, adding the images of each batch it
    yields to ``bar`` while one is set."""

    def __init__(self, loader: Iterable, bar: Any = None) -> None:
        self.loader, self.bar = loader, bar

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            if self.bar is not None:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                self.bar.update(len(images))
            yield batch


@contextmanager
def source_reading_progress(options: MutableMapping[str, Any], method: str, show: bool) -> Iterator[None]:
    """A progress bar of the source images a method reads while it is wrapped:
    RMT's and SANTA's prototypes and RMT's warm-up (minutes on a CPU, 100,000
    images on CIFAR-10), FOA's statistics, EATA's Fisher information. The loaders
    in ``options`` are replaced by counting views of themselves, which count no
    more once the block ends (RMT replays from its loader at every step)."""
    names = [k for k in SOURCE_OPTIONS if options.get(k) is not None]
    if not show or not names:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(unit="img", desc=f"{method}: source images", dynamic_ncols=True, mininterval=0.5, leave=False)
    views = [CountedReads(options[k], bar) for k in names]
    options.update(zip(names, views))
    try:
        yield
    finally:
        for view in views:
            view.bar = None
        bar.close()
