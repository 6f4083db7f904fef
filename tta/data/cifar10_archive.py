"""The published CIFAR-10 python archive: what it holds, getting it, reading it.

- What was published: the URL, the md5s of ``cifar-10-python.tar.gz`` and of each
  batch file in it, the class names, the batch files of each split.
- :func:`_download_cifar10`: the archive, downloaded with torchvision.
- :func:`_read_cifar10_source`: the batch files, from the archive or its extracted
  ``cifar-10-batches-py`` folder, checked against the published md5s.
- :func:`_decode_classes`, :func:`_decode_batch`: their content, unpickled by a
  restricted unpickler that loads arrays, lists and bytes and calls nothing else.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from ._files import _WRITE_ELSEWHERE, Log, _hash_file, _mismatch

#: CIFAR-10's class names in label order (``batches.meta``'s ``label_names``), the
#: class folder names of tta's ImageFolder copy (sorted, so folder index = label).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_NAME = "cifar-10-python.tar.gz"
CIFAR10_FOLDER_NAME = "cifar-10-batches-py"
# The published md5s of the CIFAR-10 python archive and of the files in it, as
# torchvision 0.29 lists them (torchvision/datasets/cifar.py, class CIFAR10:
# tgz_md5, train_list, test_list, meta["md5"]).
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_META = "batches.meta"
#: Images per class of the published splits.
CIFAR10_PER_CLASS = {"train": 5000, "test": 1000}


def _download_cifar10(download_dir: Path, log: Log) -> Path:
    """Download the published archive with torchvision into ``download_dir``; the
    error says how to do it by hand when the network or the folder does not allow it."""
    offline = (
        f"To prepare CIFAR-10 offline: download {CIFAR10_URL} (md5 {CIFAR10_TAR_MD5}) where the "
        f"network allows, copy it to this machine and run `tta-data cifar10 --source /path/to/{CIFAR10_TAR_NAME}` "
        f"(or --source the extracted {CIFAR10_FOLDER_NAME} folder)"
    )
    tarball = download_dir / CIFAR10_TAR_NAME
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the download folder {download_dir} ({err}): {_WRITE_ELSEWHERE}. "
                           f"{offline}") from err
    log(f"downloading {CIFAR10_URL} into {download_dir} (about 163 MiB; an archive downloaded "
        "there before is checked and reused)")
    from torchvision.datasets import CIFAR10

    try:  # torchvision checks the md5s, reuses a good earlier download and replaces a broken one
        CIFAR10(root=str(download_dir), train=False, download=True)
    except Exception as err:  # noqa: BLE001 - urllib, http and torchvision's own errors
        raise RuntimeError(f"could not download CIFAR-10 from {CIFAR10_URL} ({type(err).__name__}: {err}). "
                           f"{offline}") from err
    if tarball.is_file():
        return tarball
    folder = download_dir / CIFAR10_FOLDER_NAME
    if folder.is_dir():
        return folder
    raise RuntimeError(f"the download left neither {tarball} nor {folder}. {offline}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch file (a dict of numpy arrays, lists and bytes) and
    nothing else: no other global can be called by a crafted file."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy.core"):  # pickles written by numpy < 2
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR-10 batch file holds only arrays, lists and bytes"
        )


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - any failure means "not a CIFAR-10 batch"
        raise ValueError(f"{where} is not a CIFAR-10 python batch file ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where} is not a CIFAR-10 python batch file (holds a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar10_folder(source: Path) -> Path:
    """The folder holding the batch files: ``source`` or its ``cifar-10-batches-py``."""
    if (source / CIFAR10_META).is_file() or not (source / CIFAR10_FOLDER_NAME).is_dir():
        return source
    return source / CIFAR10_FOLDER_NAME


def _read_cifar10_source(
    source: Path, names: Sequence[str], verify: bool, progress: bool, log: Log
) -> dict[str, tuple[str, bytes]]:
    """``{name: (where it was read, its bytes)}`` of the named batch files, from the
    archive or the extracted folder, checked against the published md5s when ``verify``."""
    layout = (f"expected {CIFAR10_TAR_NAME} (from {CIFAR10_URL}) or its extracted "
              f"{CIFAR10_FOLDER_NAME} folder ({', '.join(CIFAR10_FILE_MD5)})")
    if not source.exists():
        raise FileNotFoundError(f"--source {source} does not exist: {layout}")
    files: dict[str, bytes] = {}
    if source.is_dir():
        folder = _cifar10_folder(source)
        for name in names:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: --source {source} is not a complete {layout}")
            files[name] = path.read_bytes()
        where = {name: str(folder / name) for name in names}
    else:
        if not tarfile.is_tarfile(source):
            raise ValueError(f"--source {source} is not a tar archive nor a folder: {layout}")
        if verify:
            got = _hash_file(source, ["md5"], progress)["md5"]
            if got != CIFAR10_TAR_MD5:
                raise _mismatch(str(source), "md5", CIFAR10_TAR_MD5, got,
                                f"download it again from {CIFAR10_URL}")
            log(f"{source}: md5 {got} matches the published {CIFAR10_TAR_NAME}")
        wanted = set(names)
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                base = PurePosixPath(member.name).name
                if member.isfile() and base in wanted and base not in files:
                    files[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
        absent = [n for n in names if n not in files]
        if absent:
            raise FileNotFoundError(f"{source} lacks {', '.join(absent)}: {layout}")
        where = {name: f"{source}:{CIFAR10_FOLDER_NAME}/{name}" for name in names}
    if verify:
        for name in names:
            got = hashlib.md5(files[name]).hexdigest()
            if got != CIFAR10_FILE_MD5[name]:
                raise _mismatch(where[name], "md5", CIFAR10_FILE_MD5[name], got,
                                f"get the published archive again from {CIFAR10_URL}")
        if source.is_dir():
            log(f"{_cifar10_folder(source)}: the md5s of {', '.join(names)} match the published ones")
    return {name: (where[name], files[name]) for name in names}


def _decode_classes(raw: bytes, where: str) -> tuple[str, ...]:
    meta = _unpickle(raw, where)
    names = meta.get("label_names")
    if not isinstance(names, list):
        raise ValueError(f"{where} has no label_names list: not CIFAR-10's batches.meta")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if classes != CIFAR10_CLASSES:
        raise ValueError(
            f"{where} lists the classes {list(classes)}, not CIFAR-10's {list(CIFAR10_CLASSES)}: "
            f"not the CIFAR-10 python archive (CIFAR-100 is another download)"
        )
    return classes


def _decode_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 32, 32, 3) uint8 RGB, labels (N,) int64)`` of one batch file."""
    batch = _unpickle(raw, where)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{where}: 'data' holds {desc}, expected uint8 (N, 3072) (R, G, B planes of 32x32)")
    labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
    if labels is None or labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: 'labels' must hold one class index per image ({data.shape[0]})")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{where}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels
