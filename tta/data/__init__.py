"""Small, dependency-light image loading for tests, examples and benchmarks.

``tta.data.prepare`` (the ``tta-data`` command, also ``python -m tta.data``) puts
the data sets tta reads into the layout it reads them in.
"""

from __future__ import annotations

import numbers
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .._warn import warn_at_caller
from ..paths import tta_home

__all__ = ["IMG_EXTENSIONS", "NOT_CLASS_FOLDERS", "is_class_folder", "is_image_file", "class_folders",
           "list_image_folder", "load_image_folder", "cifar10_dir", "imagenet_wnids", "to_rgb8",
           "ImageFileError", "naming_image_file"]

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


def is_image_file(name: str) -> bool:
    """Whether a file named ``name`` in a class folder is an image: it ends in one of
    :data:`IMG_EXTENSIONS` (any case) and is not hidden. macOS leaves a hidden
    ``._<name>`` (AppleDouble metadata, not an image) beside every file it copies
    to a foreign disk or zips: counted, each would be a file that fails to decode."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders directly in ``root`` (see :func:`is_class_folder`)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and is_class_folder(e.name))


def _pillow_extensions() -> set[str]:
    """Extensions of the formats Pillow can open (``.tif``, ``.gif``, ``.ppm`` ...)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _skipped_text(skipped: Counter) -> str:
    return ", ".join(f"{ext} ({n})" for ext, n in skipped.most_common(5)) + (" ..." if len(skipped) > 5 else "")


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and sorted class names of an ImageFolder tree.

    Images are the files :func:`is_image_file` accepts (an extension of
    :data:`IMG_EXTENSIONS`, any case, not hidden); class folders those
    :func:`is_class_folder` accepts. Image files of other formats
    (``.tif``, ``.gif`` ...) are left out, with a warning that counts them, and so
    are folders inside class folders (one level is read: torchvision's ImageFolder
    also reads the images of such sub-folders)."""
    root = Path(root).expanduser()  # as torchvision's ImageFolder and tta-bench's data.root
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected <root>/<class>/<image>)")
    classes = class_folders(root)
    files, labels = [], []
    skipped: Counter = Counter()  # non-hidden files of other extensions, by extension
    nested: list[Path] = []  # folders inside class folders, whose images are not read
    for idx, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if is_image_file(f.name):
                files.append(f)
                labels.append(idx)
            elif not f.name.startswith(".") and f.is_file():
                skipped[f.suffix.lower() or "(no extension)"] += 1
            elif is_class_folder(f.name) and f.is_dir():
                nested.append(f)
    accepted = ", ".join(IMG_EXTENSIONS)
    sub_folders = (f"{len(nested)} folders inside class folders, e.g. {nested[0]}, left out: tta reads "
                   "<root>/<class>/<image>, one level (move the images of sub-folders up into their class "
                   "folder)" if nested else "")
    if not files:
        found = (f"{len(classes)} class folders ({', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''})"
                 if classes else "no class folders")
        other = (f"; {sum(skipped.values())} files left out for their extension: {_skipped_text(skipped)} "
                 "(convert images to one of the accepted formats)" if skipped else "")
        raise FileNotFoundError(
            f"no images under {root} (expected <root>/<class>/<image>, image files ending in {accepted}, "
            f"any case): found {found}{other}{'; ' + sub_folders if nested else ''}"
        )
    if nested:  # as the image files of other formats: a data set shrunk without a word otherwise
        warn_at_caller(sub_folders)
    # Readme and notes files are expected beside images; image files of a format
    # tta does not list would silently shrink the data set, so those are counted.
    readable = _pillow_extensions() if skipped else set()
    images_skipped = Counter({e: n for e, n in skipped.items() if e in readable})
    if images_skipped:
        warn_at_caller(
            f"{sum(images_skipped.values())} image files under {root} left out for their extension: "
            f"{_skipped_text(images_skipped)}; tta reads {accepted} (convert the others to use them)"
        )
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
    root: str | os.PathLike, num_images: int | None = None, seed: int | None = 0, shuffle: bool = True,
    *, uint8: bool = False,
) -> tuple[Tensor, Tensor]:
    """Decode (a seeded random subset of) an ImageFolder into float RGB in [0, 1]
    (``uint8=True``: the 0-255 levels as uint8, a quarter of the memory).

    ``num_images``: how many images, at most (the whole folder when it holds fewer);
    ``None``: all. ``seed``: the same seed gives the same images in the same order;
    ``None`` draws a different random subset and order at each call (from the
    operating system's entropy). ``shuffle=False``: the first ``num_images`` of the
    sorted listing, in that order.

    Returns ``(images (N, 3, H, W), labels (N,))``; all images must share one size
    (``ValueError`` naming two files of different sizes otherwise).
    """
    # a bool is an int to Python, and a negative count would slice from the end
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, numbers.Integral)
                                   or num_images < 1):
        raise ValueError(f"num_images={num_images!r}: give a whole number of images, 1 or more (None: all)")
    files, labels, _ = list_image_folder(root)
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else np.arange(len(files))
    if num_images is not None:
        order = order[:num_images]
    arrays = []
    for i in order:
        arrays.append(_decode_rgb8(files[i]))
        if arrays[-1].shape != arrays[0].shape:
            (h0, w0), (h, w) = arrays[0].shape[:2], arrays[-1].shape[:2]
            raise ValueError(
                f"images of different sizes under {root}: {files[order[0]]} is {w0}x{h0}, {files[i]} is {w}x{h}; "
                "load_image_folder stacks them into one tensor: resize them to one size first (tta-bench "
                "resizes each image as it reads it: data.image_size)"
            )
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x.contiguous() if uint8 else x.float().div_(255)
    y = torch.tensor([labels[i] for i in order])
    return x, y


def _decode_rgb8(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (:class:`ImageFileError` naming it when
    it cannot be decoded)."""
    with naming_image_file(path), Image.open(path) as img:
        return np.asarray(to_rgb8(img))


class ImageFileError(OSError):
    """Image files that cannot be read; the message names every one."""


@contextmanager
def naming_image_file(path: str | os.PathLike, hint: str = "") -> Iterator[None]:
    """Re-raise what decoding ``path`` raises inside the block as an
    :class:`ImageFileError` that names the file, ending with ``hint``: Pillow's own
    errors (e.g. "Truncated File Read" for a cut JPEG) do not say which of a
    folder's files it was. ``MemoryError`` passes through."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - Pillow raises assorted errors on damaged files
        raise ImageFileError(
            f"cannot decode image file {path} ({type(err).__name__}: {err}); replace or remove it{hint}"
        ) from err


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted wnids, the
    order of torchvision/timm ImageNet classifiers), shipped with tta.data."""
    path = Path(__file__).with_name("imagenet_wnids.txt")
    wnids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"{path} is damaged: expected 1000 wnids, found {len(wnids)}")
    return wnids
