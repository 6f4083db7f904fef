"""Image files: the cheap check that finds unreadable files before a run streams,
decoding, and the seeded pick of the files a run uses (bad ones named, or replaced
with ``data.skip_bad_files``)."""

from __future__ import annotations

import os
import stat as stat_mod
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data import ImageFileError, naming_image_file, to_rgb8

__all__ = ["ImageFileError", "check_image_file", "check_image_files", "decode_image", "bad_files_error",
           "seeded_subset", "pick_files"]


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
    hint = (" (tta-bench checks the files a run uses before streaming, and data.skip_bad_files=true "
            "leaves out the ones that fail that check)")
    with naming_image_file(path, hint):
        return _decode_image(path, size, crop_ratio)


def _decode_image(path: str | os.PathLike, size: int | None, crop_ratio: float) -> Tensor:
    with Image.open(path) as img:
        img = to_rgb8(img)
        # An image already at the target size is taken to be cropped already (as
        # ImageNet-C's 224-px centre crops are) and used whole: crop_ratio would
        # crop it a second time. Documented where crop_ratio is (conf/data_base.yaml).
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


def seeded_subset(n: int, num_images: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of ``range(n)``: the same seed and ``n`` give the same
    images, so every domain of a source (and every method) sees the same ones."""
    perm = np.random.default_rng([seed, 0]).permutation(n)
    return perm if num_images is None else perm[: int(num_images)]


def pick_files(files: Sequence[Path], num_images: int | None, seed: int, *, skip_bad: bool,
               where: str, num_workers: int = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The seeded subset of :func:`seeded_subset`, with each file checked first
    (:func:`check_image_file`): the rows of the readable files and ``(path,
    reason)`` of the others. Only the files the run uses are checked; with
    ``skip_bad``, each bad file is replaced by the next one of the seeded order
    (so the subset keeps its size, and is the usual one when no file is bad)."""
    order = seeded_subset(len(files), None, seed)
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
