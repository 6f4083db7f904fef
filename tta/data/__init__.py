"""Small, dependency-light image loading for tests, examples and benchmarks.

``tta.data.prepare`` (the ``tta-data`` command, also ``python -m tta.data``) puts
the data sets tta reads into the layout it reads them in.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..paths import tta_home

__all__ = ["IMG_EXTENSIONS", "NOT_CLASS_FOLDERS", "is_class_folder", "class_folders", "list_image_folder",
           "load_image_folder", "cifar10_dir", "imagenet_wnids", "to_rgb8"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Folders that tools leave beside class folders and that hold no class: macOS's
#: ``__MACOSX`` (a zip's resource forks) and Synology's ``@eaDir`` (thumbnails).
#: Hidden folders (``.ipynb_checkpoints``, ``.git``, ...) are not classes either.
NOT_CLASS_FOLDERS = ("__MACOSX", "@eaDir")


def cifar10_dir(split: str = "test") -> Path:
    """``$TTA_HOME/data/cifar10/<split>`` (ImageFolder layout), checked to exist."""
    path = tta_home() / "data" / "cifar10" / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 {split} images not found at {path}: expected an ImageFolder "
            f"layout <root>/<class>/<image> under $TTA_HOME/data/cifar10 (TTA_HOME={tta_home()}). "
            "Get them with `tta-data cifar10` (downloads the published archive; offline: "
            "`tta-data cifar10 --source cifar-10-python.tar.gz`), or point TTA_HOME at a "
            "folder that holds data/cifar10"
        )
    return path


def is_class_folder(name: str) -> bool:
    """Whether a folder named ``name`` beside class folders is a class: not hidden
    (``.``-prefixed) and none of :data:`NOT_CLASS_FOLDERS`. The one rule of every
    reader and checker in tta (``tta-data`` and ``tta-bench`` alike): counted as a
    class, such a folder would take a label and shift those of the classes sorted
    after it (``.``, ``@`` and ``_`` sort before letters: usually all of them)."""
    return not name.startswith(".") and name not in NOT_CLASS_FOLDERS


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders directly in ``root`` (see :func:`is_class_folder`)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and is_class_folder(e.name))


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and sorted class names of an ImageFolder tree (class folders:
    those :func:`is_class_folder` accepts)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected <root>/<class>/<image>)")
    classes = class_folders(root)
    files, labels = [], []
    for idx, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if f.suffix.lower() in IMG_EXTENSIONS:
                files.append(f)
                labels.append(idx)
    if not files:
        raise FileNotFoundError(f"no images under {root} (expected <root>/<class>/<image>)")
    return files, labels, classes


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, as ``img.convert("RGB")`` but for 16-bit greyscale
    (modes ``I;16``, ``I;16B``, ...), which Pillow's conversion clips to 255 (a
    white image) instead of scaling: those keep their high byte, as Pillow does
    itself for 16-bit colour PNGs."""
    if img.mode.startswith("I;16"):
        high = (np.asarray(img) >> 8).astype(np.uint8)
        img = Image.fromarray(high)
    return img.convert("RGB")


def load_image_folder(
    root: str | os.PathLike, num_images: int | None = None, seed: int = 0, shuffle: bool = True,
    *, uint8: bool = False,
) -> tuple[Tensor, Tensor]:
    """Decode (a seeded random subset of) an ImageFolder into float RGB in [0, 1]
    (``uint8=True``: the 0-255 levels as uint8, a quarter of the memory).

    Returns ``(images (N, 3, H, W), labels (N,))``; all images must share one size.
    """
    files, labels, _ = list_image_folder(root)
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else np.arange(len(files))
    if num_images is not None:
        order = order[:num_images]
    arrays = []
    for i in order:
        with Image.open(files[i]) as img:
            arrays.append(np.asarray(to_rgb8(img)))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x.contiguous() if uint8 else x.float().div_(255)
    y = torch.tensor([labels[i] for i in order])
    return x, y


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted wnids, the
    order of torchvision/timm ImageNet classifiers), shipped with tta.data."""
    path = Path(__file__).with_name("imagenet_wnids.txt")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"{path} is damaged: expected 1000 wnids, found {len(wnids)}")
    return wnids
