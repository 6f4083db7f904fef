"""``tta-data``: put the data sets tta reads into the layout it reads them in.

Three subcommands (also ``python -m tta.data``), each usable from Python:

``tta-data cifar10`` / :func:`prepare_cifar10`
    CIFAR-10 as lossless PNG files in the ImageFolder layout tta reads,
    ``<root>/data/cifar10/{train,test}/<class>/<NNNN>.png``, from the published
    python archive (``cifar-10-python.tar.gz``: downloaded, or ``--source`` a local
    copy of the archive or of its extracted ``cifar-10-batches-py`` folder), checked
    against the published checksums.
``tta-data cifar10-c`` / :func:`prepare_cifar10c`
    Checks (and, from ``CIFAR-10-C.tar``, extracts) CIFAR-10-C as ``data=cifar10c_disk``
    reads it: ``<root>/<corruption>.npy`` + ``labels.npy``.
``tta-data imagenet-c`` / :func:`prepare_imagenetc`
    The same for ImageNet-C (``data=imagenetc``):
    ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``.

Everything is written atomically: into a temporary folder beside the target, renamed
into place when complete, so an interrupted run leaves no half-written data set.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..paths import tta_home
from . import IMG_EXTENSIONS

__all__ = [
    "CIFAR10_CLASSES",
    "ChecksumError",
    "DataNotFoundError",
    "DataReport",
    "PublishedFile",
    "prepare_cifar10",
    "prepare_cifar10c",
    "prepare_imagenetc",
    "check_cifar10c_folder",
    "check_imagenetc_folder",
    "cifar10_next_step",
    "main",
]

Log = Callable[[str], None]

# ----------------------------------------------------------------------------------
# Published files and their checksums
# ----------------------------------------------------------------------------------

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
#: Name of the file :func:`prepare_cifar10` leaves in each split folder it writes.
MARKER = ".tta-data.json"


@dataclass(frozen=True)
class PublishedFile:
    """A published archive and the checksums published for it (``None``: none known)."""

    name: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    corruptions: tuple[str, ...] = ()
    origin: str = ""


CIFAR10C_RECORD = "https://zenodo.org/records/2535967"
# md5: as the Zenodo record lists it (also used by torchvision-style loaders across
# many projects); size and sha256: tensorflow_datasets'
# tensorflow_datasets/url_checksums/cifar10_corrupted.txt.
CIFAR10C_TAR = PublishedFile(
    name="CIFAR-10-C.tar",
    url=f"{CIFAR10C_RECORD}/files/CIFAR-10-C.tar",
    md5="56bf5dcef84df0e2308c6dcbcbbd8499",
    sha256="c72763e101c723b7c507b96205f7e938912a5d587376173b825850cf3cb876a7",
    size=2918471680,
    origin="md5 from the Zenodo record, size and sha256 from tensorflow_datasets' url_checksums",
)

IMAGENETC_RECORD = "https://zenodo.org/records/2235448"
# md5s: as the Zenodo record lists them (the same values are used by the ImageNet-C
# loaders of many projects). tensorflow_datasets' imagenet2012_corrupted renders the
# corruptions itself and lists no checksum for these files, so no sha256 is known.
# Contents: the grouping of the ImageNet-C README (noise, blur, weather, digital, extra).
IMAGENETC_TARS: dict[str, PublishedFile] = {
    "noise": PublishedFile(
        "noise.tar", f"{IMAGENETC_RECORD}/files/noise.tar", md5="e80562d7f6c3f8834afb1ecf27252745",
        corruptions=("gaussian_noise", "shot_noise", "impulse_noise"), origin="md5 from the Zenodo record",
    ),
    "blur": PublishedFile(
        "blur.tar", f"{IMAGENETC_RECORD}/files/blur.tar", md5="2d8e81fdd8e07fef67b9334fa635e45c",
        corruptions=("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"), origin="md5 from the Zenodo record",
    ),
    "weather": PublishedFile(
        "weather.tar", f"{IMAGENETC_RECORD}/files/weather.tar", md5="33ffea4db4d93fe4a428c40a6ce0c25d",
        corruptions=("snow", "frost", "fog", "brightness"), origin="md5 from the Zenodo record",
    ),
    "digital": PublishedFile(
        "digital.tar", f"{IMAGENETC_RECORD}/files/digital.tar", md5="89157860d7b10d5797849337ca2e5c03",
        corruptions=("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
        origin="md5 from the Zenodo record",
    ),
    "extra": PublishedFile(
        "extra.tar", f"{IMAGENETC_RECORD}/files/extra.tar", md5="d492dfba5fc162d8ec2c3cd8ee672984",
        corruptions=("speckle_noise", "gaussian_blur", "spatter", "saturate"), origin="md5 from the Zenodo record",
    ),
}

SEVERITIES = (1, 2, 3, 4, 5)


def _corruption_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the 15 benchmark corruptions, the 4 held-out extras) of tta.corruptions."""
    from ..corruptions import EXTRA_NAMES, NAMES

    return tuple(NAMES), tuple(EXTRA_NAMES)


# ----------------------------------------------------------------------------------
# Errors and reports
# ----------------------------------------------------------------------------------


class ChecksumError(RuntimeError):
    """A file does not match its published checksum; the message names the file,
    both checksums and the way to go on anyway (``--no-verify`` / ``verify=False``)."""


class DataNotFoundError(FileNotFoundError):
    """The data set is not on this machine; the message says where to get it."""


def _mismatch(what: str, algorithm: str, expected: str, actual: str, fix: str) -> ChecksumError:
    return ChecksumError(
        f"{what}: {algorithm} {actual} does not match the published {algorithm} {expected}. "
        f"The file is damaged or not the published one: {fix}. To use a modified copy "
        "anyway, pass --no-verify (verify=False from Python)"
    )


@dataclass
class DataReport:
    """What a layout check found.

    ``missing``: required entries that are absent; ``bad``: entries present but
    unusable, with the reason; ``optional_missing``: absent entries the benchmark
    does not need by default (the 4 held-out corruptions). ``counts``: images per
    entry. ``usable``: nothing missing and nothing bad.
    """

    dataset: str
    root: Path
    present: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    optional_missing: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = SEVERITIES

    @property
    def usable(self) -> bool:
        return not self.missing and not self.bad

    def summary(self) -> str:
        lines = [f"{self.dataset} at {self.root}:"]
        lines.append(f"  present: {len(self.present)}: {', '.join(self.present) or 'nothing'}")
        if self.counts:
            sizes = sorted(set(self.counts.values()))
            if len(sizes) == 1:
                lines.append(f"  images: {sizes[0]} in each of the {len(self.counts)} checked")
            else:
                lines.append("  images: " + ", ".join(f"{k} {v}" for k, v in self.counts.items()))
        if self.missing:
            lines.append(f"  missing: {len(self.missing)}: {', '.join(self.missing)}")
        if self.bad:
            lines.append(f"  bad: {len(self.bad)}")
            lines += [f"    {name}: {why}" for name, why in self.bad.items()]
        if self.optional_missing:
            lines.append(
                f"  not present (optional, the held-out corruptions): {', '.join(self.optional_missing)}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  usable: yes" if self.usable else "  usable: NO")
        return "\n".join(lines)

    def next_step(self) -> str:
        data = "cifar10c_disk" if self.dataset == "CIFAR-10-C" else "imagenetc"
        benchmark, _ = _corruption_names()
        extra = ""
        if tuple(self.corruptions) != benchmark:
            extra += f" 'data.corruptions=[{','.join(self.corruptions)}]'"
        if len(self.severities) == 1:
            extra += f" data.severity={self.severities[0]}"
        line = f"tta-bench data={data} data.root={self.root}{extra}"
        if data == "cifar10c_disk" and not (tta_home() / "data" / "cifar10" / "train").is_dir():
            line += ("\n  (EATA's Fisher regulariser also reads clean training images, data.source_root: "
                     "`tta-data cifar10 --split train` writes them)")
        return line


# ----------------------------------------------------------------------------------
# Small helpers: hashing, progress, atomic folders
# ----------------------------------------------------------------------------------


def _bar(total: int | None, desc: str, progress: bool, unit: str = "it") -> tqdm:
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False)


class _HashingReader:
    """A read-only file wrapper that feeds every byte read through hashers and a
    progress bar (so a tar is hashed while it is extracted, in one pass)."""

    def __init__(self, fh: BinaryIO, algorithms: Iterable[str], bar: tqdm | None = None):
        self._fh = fh
        self.hashers = {a: hashlib.new(a) for a in algorithms}
        self._bar = bar

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        for h in self.hashers.values():
            h.update(data)
        if self._bar is not None:
            self._bar.update(len(data))
        return data

    def drain(self) -> None:
        """Read (and hash) what the tar reader left: the end-of-archive padding."""
        while self.read(1 << 20):
            pass

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashers.items()}


def _hash_file(path: Path, algorithms: Sequence[str], progress: bool, desc: str | None = None) -> dict[str, str]:
    """Hex digests of a file, read once, with a progress bar in bytes."""
    with open(path, "rb") as fh, _bar(path.stat().st_size, desc or f"checksum {path.name}", progress, "B") as bar:
        reader = _HashingReader(fh, algorithms, bar)
        reader.drain()
    return reader.hexdigests()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(parent: Path, name: str, log: Log) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` folders left by an
    interrupted (killed) earlier run whose process is gone."""
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{name}.{kind}-*"):
            try:
                pid = int(path.name[len(f".{name}.{kind}-"):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                log(f"removed {path}, left by an interrupted earlier run")


def _temp_dir(target: Path, kind: str = "tmp") -> Path:
    """A new empty folder beside ``target`` (same file system, so a rename moves it
    into place), created with the umask's permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` (the caller checked it may
    go) is renamed aside first and removed after, so ``target`` is never half there."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if target.exists() or target.is_symlink():
        old = _temp_dir(target, "old")
        old.rmdir()
        os.rename(target, old)
        os.rename(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, target)


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# ----------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------


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


def _image_counts(folder: Path) -> dict[str, int]:
    counts = {}
    for entry in os.scandir(folder):
        if entry.is_dir():
            counts[entry.name] = sum(1 for f in os.scandir(entry.path) if _is_image(f.name) and f.is_file())
    return counts


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
        raise RuntimeError(f"cannot create the download folder {download_dir} ({err}). {offline}") from err
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


def _check_splits(splits: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(splits, str):
        splits = ("train", "test") if splits == "both" else (splits,)
    out = []
    for s in splits:
        if s not in CIFAR10_SPLIT_FILES:
            raise ValueError(f"unknown CIFAR-10 split {s!r}: choose train, test or both")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("no CIFAR-10 split asked for: choose train, test or both")
    return tuple(out)


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
    root = _abs(root) if root is not None else tta_home()
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
        _remove_leftovers(target.parent, target.name, log)
        tmp = _temp_dir(target)
        try:
            counts = _write_pngs(images, labels, tmp, workers, progress, f"cifar10 {split}")
            info = {"dataset": "cifar10", "split": split, "format": "png", "classes": list(CIFAR10_CLASSES),
                    "counts": counts, "source": str(source), "verified": bool(verify)}
            (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
            _move_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        keys.append(f"data.root={targets['test']}")
    if "train" in targets:
        keys.append(f"data.source_root={targets['train']}")
    explicit = f"tta-bench data=cifar10c {' '.join(keys)}"
    root = roots.pop() if len(roots) == 1 else None
    if root is not None and root == tta_home():
        return (f"Next step:\n  tta-bench data=cifar10c    # reads them from $TTA_HOME ({root}): nothing to set\n"
                f"(the same, spelled out: {explicit})")
    lines = ["Next step, either:"]
    if root is not None:
        lines += [f"  export TTA_HOME={root}", "  tta-bench data=cifar10c", "or, leaving TTA_HOME as it is:"]
    lines.append(f"  {explicit}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Tar extraction (CIFAR-10-C, ImageNet-C)
# ----------------------------------------------------------------------------------


def _safe_parts(name: str, where: Path) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts:
        raise ValueError(f"{where} holds the unsafe member {name!r} (absolute or with ..): refusing to extract it")
    return parts


def _extract_tar(
    tar_path: Path, dest: Path, published: PublishedFile | None, verify: bool, progress: bool,
    strip: Callable[[tuple[str, ...]], tuple[str, ...] | None] = lambda parts: parts,
) -> dict[str, str]:
    """Extract the regular files and folders of ``tar_path`` into ``dest`` in one
    streaming pass that also hashes the file; ``strip`` maps a member's path parts
    to where it goes under ``dest`` (``None``: skip it). Returns the digests (empty
    when not ``verify``); the caller compares them."""
    algorithms = [a for a in ("md5", "sha256") if verify and published and getattr(published, a)]
    size = tar_path.stat().st_size
    with open(tar_path, "rb") as fh, _bar(size, f"extract {tar_path.name}", progress, "B") as bar:
        reader = _HashingReader(fh, algorithms, bar)
        made: set[Path] = set()

        def mkdir(path: Path) -> None:
            if path not in made:
                path.mkdir(parents=True, exist_ok=True)
                made.add(path)

        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tar:  # type: ignore[call-overload]
                for member in tar:
                    parts = strip(_safe_parts(member.name, tar_path))
                    if not parts:
                        continue
                    out = dest.joinpath(*parts)
                    if member.isdir():
                        mkdir(out)
                    elif member.isfile():  # links, devices and the like are left out
                        mkdir(out.parent)
                        src = tar.extractfile(member)
                        with open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)  # type: ignore[misc]
        except tarfile.TarError as err:
            raise ValueError(f"{tar_path} is not a readable tar archive ({err})") from err
        reader.drain()
    return reader.hexdigests()


def _verify_digests(tar_path: Path, published: PublishedFile, digests: dict[str, str], log: Log) -> None:
    for algorithm, got in digests.items():
        expected = getattr(published, algorithm)
        if got != expected:
            raise _mismatch(str(tar_path), algorithm, expected, got,
                            f"download {published.name} again from {published.url}")
    if digests:
        log(f"{tar_path}: {' and '.join(digests)} match the published {published.name} ({published.origin})")


def _check_size(tar_path: Path, published: PublishedFile) -> None:
    size = tar_path.stat().st_size
    if published.size is not None and size != published.size:
        raise ChecksumError(
            f"{tar_path}: {size} bytes, the published {published.name} has {published.size} "
            f"(an incomplete download?): download it again from {published.url}. To use a "
            "modified copy anyway, pass --no-verify (verify=False from Python)"
        )


def _wanted_corruptions(corruptions: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) corruption names: by default the 15 benchmark ones are
    required and the 4 extras optional; a given list (or ``all``) is all required."""
    benchmark, extra = _corruption_names()
    if corruptions is None:
        return benchmark, extra
    names = list(corruptions)
    if [n.lower() for n in names] == ["all"]:
        return benchmark + extra, ()
    out = []
    for name in names:
        key = name.strip().lower().replace("-", "_")
        if key not in benchmark + extra:
            close = difflib.get_close_matches(key, benchmark + extra, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown corruption {name!r}{hint} (choose from {', '.join(benchmark + extra)}, or all)")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no corruption asked for")
    return tuple(out), ()


# ----------------------------------------------------------------------------------
# CIFAR-10-C
# ----------------------------------------------------------------------------------


def _cifar10c_howto(root_dir: Path) -> str:
    return (
        f"CIFAR-10-C is not at {root_dir}. It is published on Zenodo ({CIFAR10C_RECORD}) as "
        f"{CIFAR10C_TAR.name} ({CIFAR10C_TAR.size / 2**30:.1f} GiB, md5 {CIFAR10C_TAR.md5}): {CIFAR10C_TAR.url}\n"
        "Download it, then either\n"
        f"  tta-data cifar10-c --source /path/to/{CIFAR10C_TAR.name}      # checks it, extracts it to {root_dir}\n"
        f"or extract it yourself (mkdir -p {root_dir.parent} && tar -xf {CIFAR10C_TAR.name} -C {root_dir.parent}) "
        "and check the folder with\n"
        f"  tta-data cifar10-c --source {root_dir}\n"
        f"then run: tta-bench data=cifar10c_disk data.root={root_dir}"
    )


def check_cifar10c_folder(folder: str | os.PathLike, corruptions: Sequence[str] | None = None) -> DataReport:
    """Check a CIFAR-10-C folder as ``data=cifar10c_disk`` reads it, without loading
    the arrays (shapes and dtypes from the ``.npy`` headers, ``mmap_mode="r"``).

    ``labels.npy``: ``(5 * N,)`` integers in 0..9; each ``<corruption>.npy``: uint8
    ``(5 * N, 32, 32, 3)`` (severities 1-5 stacked). ``corruptions``: the names to
    require (default: the 15 benchmark corruptions required, the 4 extras checked
    when present; ``["all"]``: all 19)."""
    folder = _abs(folder)
    required, optional = _wanted_corruptions(corruptions)
    report = DataReport("CIFAR-10-C", folder, corruptions=required)
    if not folder.is_dir():
        report.missing = ["labels.npy"] + [f"{c}.npy" for c in required]
        report.notes.append(f"{folder} is not a folder")
        return report
    n_labels: int | None = None
    label_path = folder / "labels.npy"
    if not label_path.is_file():
        report.missing.append("labels.npy")
    else:
        try:
            labels = np.load(label_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            report.bad["labels.npy"] = f"not a readable .npy file ({err})"
        else:
            if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] % 5 or not labels.shape[0]:
                report.bad["labels.npy"] = f"holds {labels.dtype} {labels.shape}: expected integers (5 * N,)"
            elif int(labels.min()) < 0 or int(labels.max()) > 9:
                report.bad["labels.npy"] = f"labels outside 0..9 (min {labels.min()}, max {labels.max()})"
            else:
                n_labels = labels.shape[0]
                report.present.append("labels.npy")
                if n_labels != 50000:
                    report.notes.append(f"labels.npy has {n_labels} labels (the published set: 50000, "
                                        "5 severities x 10000)")
    for name in required + optional:
        path = folder / f"{name}.npy"
        key = f"{name}.npy"
        if not path.is_file():
            (report.missing if name in required else report.optional_missing).append(key)
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            report.bad[key] = f"not a readable .npy file ({err})"
            continue
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (32, 32, 3) or arr.shape[0] % 5:
            report.bad[key] = f"holds {arr.dtype} {arr.shape}: expected uint8 (5 * N, 32, 32, 3)"
        elif n_labels is not None and arr.shape[0] != n_labels:
            report.bad[key] = f"{arr.shape[0]} images but labels.npy has {n_labels} labels"
        else:
            report.present.append(key)
            report.counts[key] = int(arr.shape[0])
    known = {f"{c}.npy" for c in required + optional} | {"labels.npy"}
    others = sorted(p.name for p in folder.glob("*.npy") if p.name not in known)
    if others:
        report.notes.append(f"other .npy files (not checked): {', '.join(others)}")
    return report


def _find_cifar10c_folder(tmp: Path) -> Path:
    if (tmp / "labels.npy").exists():
        return tmp
    subdirs = [p for p in tmp.iterdir() if p.is_dir()]
    if len(subdirs) == 1:
        return subdirs[0]
    return tmp


def prepare_cifar10c(
    source: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    corruptions: Sequence[str] | None = None,
    verify: bool = True,
    *,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
) -> DataReport:
    """Check CIFAR-10-C, and extract it first when ``source`` is ``CIFAR-10-C.tar``.

    Args:
        source: ``CIFAR-10-C.tar`` (checked against its published size, md5 and
            sha256, extracted to ``<root>/data/CIFAR-10-C``), or an extracted folder
            (checked in place). ``None``: the folder ``<root>/data/CIFAR-10-C``.
        root: a ``$TTA_HOME``; default :func:`tta.paths.tta_home`.
        corruptions: see :func:`check_cifar10c_folder`.
        verify: check the tar's checksums (``False``: a modified copy).
        force: replace an existing ``<root>/data/CIFAR-10-C`` with the tar's content.

    Returns:
        The :class:`DataReport` of the folder (``.usable``, ``.summary()``, ``.next_step()``).

    Raises:
        DataNotFoundError: no ``source`` and nothing at the default folder (the
            message says where the published file is and what to run).
        ChecksumError, FileExistsError, FileNotFoundError, ValueError.
    """
    root_dir = (_abs(root) if root is not None else tta_home()) / "data" / "CIFAR-10-C"
    _wanted_corruptions(corruptions)  # bad names fail before any work
    if source is None:
        if not root_dir.is_dir():
            raise DataNotFoundError(_cifar10c_howto(root_dir))
        return check_cifar10c_folder(root_dir, corruptions)
    source = _abs(source)
    if not source.exists():
        raise FileNotFoundError(f"--source {source} does not exist: expected {CIFAR10C_TAR.name} or the "
                                f"extracted CIFAR-10-C folder (<corruption>.npy + labels.npy)")
    if source.is_dir():
        report = check_cifar10c_folder(source, corruptions)
        report.notes.append(f"no checksums are published for the extracted files (only for {CIFAR10C_TAR.name})")
        return report
    if not tarfile.is_tarfile(source):
        raise ValueError(f"--source {source} is neither a tar archive nor a folder: expected "
                         f"{CIFAR10C_TAR.name} or the extracted CIFAR-10-C folder")
    if root_dir.exists():
        existing = check_cifar10c_folder(root_dir, corruptions)
        if existing.usable and not force:
            log(f"{root_dir} already holds a usable CIFAR-10-C: nothing extracted (--force replaces it)")
            return existing
        if not force:
            raise FileExistsError(
                f"{root_dir} exists but is not a usable CIFAR-10-C ({_short_problems(existing)}): remove it, "
                "or pass --force (force=True) to replace it with the tar's content"
            )
    published = CIFAR10C_TAR
    if verify:
        _check_size(source, published)
    _remove_leftovers(root_dir.parent, root_dir.name, log)
    tmp = _temp_dir(root_dir)
    try:
        digests = _extract_tar(source, tmp, published, verify, progress)
        if verify:
            _verify_digests(source, published, digests, log)
        else:
            log(f"{source}: checksums not checked (--no-verify)")
        content = _find_cifar10c_folder(tmp)
        report = check_cifar10c_folder(content, corruptions)
        if not report.usable:
            report.root = source
            report.notes.append(f"nothing was written to {root_dir}")
            shutil.rmtree(tmp, ignore_errors=True)
            return report
        if content != tmp:
            inner = content
            content = tmp.with_name(tmp.name + "-c")
            os.rename(inner, content)
            shutil.rmtree(tmp)
            tmp = content
        _move_into_place(tmp, root_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"extracted {source} to {root_dir}")
    return check_cifar10c_folder(root_dir, corruptions)


def _short_problems(report: DataReport) -> str:
    parts = []
    if report.missing:
        parts.append(f"missing {', '.join(report.missing[:5])}{' ...' if len(report.missing) > 5 else ''}")
    if report.bad:
        parts.append("bad " + "; ".join(f"{k}: {v}" for k, v in list(report.bad.items())[:3]))
    return ", ".join(parts) or "see tta-data for a summary"


# ----------------------------------------------------------------------------------
# ImageNet-C
# ----------------------------------------------------------------------------------


def _imagenetc_howto(root_dir: Path) -> str:
    files = "\n".join(f"  {p.url}  (md5 {p.md5}): {', '.join(p.corruptions)}" for p in IMAGENETC_TARS.values())
    return (
        f"ImageNet-C is not at {root_dir}. It is published on Zenodo ({IMAGENETC_RECORD}) as five tar files "
        f"(noise, blur, weather and digital hold the 15 benchmark corruptions, extra the 4 held-out ones):\n"
        f"{files}\n"
        "Download them, then either\n"
        f"  tta-data imagenet-c --source blur.tar --source digital.tar --source noise.tar --source weather.tar"
        f"    # checks, extracts to {root_dir}\n"
        f"or extract them yourself (mkdir -p {root_dir} && tar -xf <file>.tar -C {root_dir}) and check the folder with\n"
        f"  tta-data imagenet-c --source {root_dir}\n"
        f"then run: tta-bench data=imagenetc data.root={root_dir}"
    )


def _check_severities(severities: Sequence[int] | None) -> tuple[int, ...]:
    if severities is None:
        return SEVERITIES
    out = []
    for s in severities:
        try:
            value = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"severity {s!r} is not an integer: choose from 1..5") from None
        if value not in SEVERITIES:
            raise ValueError(f"severity {value} is out of range: choose from 1..5")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("no severity asked for: choose from 1..5")
    return tuple(sorted(out))


def check_imagenetc_folder(
    folder: str | os.PathLike,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    progress: bool = True,
) -> DataReport:
    """Check an ImageNet-C folder as ``data=imagenetc`` reads it: every
    ``<corruption>/<severity>/`` holds the 1000 wnid folders of
    :func:`tta.bench.sources.imagenet_wnids`, each with image files (not decoded).

    ``corruptions``: as in :func:`check_cifar10c_folder` (the 4 extras are checked
    when their folders exist); ``severities``: which of 1..5 to check (default all).
    Counts are per ``<corruption>/<severity>``; the published set has 50000 each."""
    from ..bench.sources import imagenet_wnids

    folder = _abs(folder)
    required, optional = _wanted_corruptions(corruptions)
    severities = _check_severities(severities)
    report = DataReport("ImageNet-C", folder, corruptions=required, severities=severities)
    wnids = set(imagenet_wnids())
    if not folder.is_dir():
        report.missing = list(required)
        report.notes.append(f"{folder} is not a folder")
        return report
    todo = [c for c in required] + [c for c in optional if (folder / c).is_dir()]
    report.optional_missing = [c for c in optional if c not in todo]
    odd_counts = []
    with _bar(len(todo) * len(severities), "check ImageNet-C", progress, "folder") as bar:
        for corruption in todo:
            if not (folder / corruption).is_dir():
                report.missing.append(corruption)
                bar.update(len(severities))
                continue
            for severity in severities:
                key = f"{corruption}/{severity}"
                bar.update(1)
                sdir = folder / corruption / str(severity)
                if not sdir.is_dir():
                    report.missing.append(key)
                    continue
                subdirs = {e.name: e.path for e in os.scandir(sdir) if e.is_dir()}
                absent = sorted(wnids - subdirs.keys())
                unknown = sorted(subdirs.keys() - wnids)
                total, empty = 0, []
                for wnid in sorted(wnids & subdirs.keys()):
                    n = sum(1 for f in os.scandir(subdirs[wnid]) if _is_image(f.name) and f.is_file())
                    total += n
                    if not n:
                        empty.append(wnid)
                problems = []
                if absent:
                    problems.append(f"{len(absent)} of the 1000 wnid folders missing (e.g. {', '.join(absent[:3])})")
                if empty:
                    problems.append(f"{len(empty)} wnid folders without images (e.g. {', '.join(empty[:3])})")
                if problems:
                    report.bad[key] = "; ".join(problems)
                else:
                    report.present.append(key)
                    report.counts[key] = total
                    if total != 50000:
                        odd_counts.append(f"{key} ({total})")
                if unknown:
                    report.notes.append(f"{key}: folders that are not ImageNet-1k wnids (ignored by "
                                        f"class_index=imagenet): {', '.join(unknown[:5])}")
    if odd_counts:
        report.notes.append("image counts other than the published 50000 (50 per class): " + ", ".join(odd_counts))
    report.notes.append("image files are counted, not opened: tta-bench checks the ones a run uses before it streams")
    return report


def _tar_group(tar_path: Path) -> tuple[str, tuple[str, ...]]:
    """(group name, leading path parts to strip) of an ImageNet-C tar, from the path
    of its first member (or the file name)."""
    by_corruption = {c: g for g, p in IMAGENETC_TARS.items() for c in p.corruptions}
    try:
        with tarfile.open(tar_path, "r|*") as tar:
            for member in tar:
                parts = _safe_parts(member.name, tar_path)
                for i, part in enumerate(parts):
                    if part in by_corruption:
                        return by_corruption[part], parts[:i]
                break
    except tarfile.TarError as err:
        raise ValueError(f"{tar_path} is not a readable tar archive ({err})") from err
    stem = tar_path.name.split(".")[0]
    if stem in IMAGENETC_TARS:
        return stem, ()
    raise ValueError(
        f"cannot tell which ImageNet-C file {tar_path} is: its first member is not under a corruption folder "
        f"and its name is none of {', '.join(p.name for p in IMAGENETC_TARS.values())}"
    )


def prepare_imagenetc(
    sources: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    root: str | os.PathLike | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    verify: bool = True,
    *,
    force: bool = False,
    progress: bool = True,
    log: Log = print,
) -> DataReport:
    """Check ImageNet-C, extracting the published tar files first when given.

    Args:
        sources: one extracted ImageNet-C folder (checked in place), or one or more
            of the published tar files (``blur.tar`` ...: each checked against its
            published md5 while it is extracted into ``<root>/data/ImageNet-C``);
            ``None``: the folder ``<root>/data/ImageNet-C``.
        root: a ``$TTA_HOME``; default :func:`tta.paths.tta_home`.
        corruptions, severities: see :func:`check_imagenetc_folder`.
        verify: check the tars' md5s (``False``: a modified copy).
        force: replace corruption folders that already exist; otherwise a tar whose
            corruption folders all exist is skipped, and one with some is an error.

    Returns:
        The :class:`DataReport` of the folder.
    """
    root_dir = (_abs(root) if root is not None else tta_home()) / "data" / "ImageNet-C"
    _wanted_corruptions(corruptions)
    _check_severities(severities)
    if sources is None or (not isinstance(sources, (str, os.PathLike)) and not sources):
        if not root_dir.is_dir():
            raise DataNotFoundError(_imagenetc_howto(root_dir))
        return check_imagenetc_folder(root_dir, corruptions, severities, progress)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = [_abs(s) for s in sources]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"--source {p} does not exist: expected an ImageNet-C tar file "
                                    f"({', '.join(t.name for t in IMAGENETC_TARS.values())}) or the extracted folder")
    folders = [p for p in paths if p.is_dir()]
    if folders:
        if len(paths) > 1:
            raise ValueError(f"--source {folders[0]} is a folder: give one extracted folder, or tar files only")
        report = check_imagenetc_folder(folders[0], corruptions, severities, progress)
        report.notes.append("no checksums are published for the extracted files (only for the tar files)")
        return report
    for p in paths:
        if not tarfile.is_tarfile(p):
            raise ValueError(f"--source {p} is neither a tar archive nor a folder")
    for tar_path in paths:
        group, prefix = _tar_group(tar_path)
        published = IMAGENETC_TARS[group]
        there = [c for c in published.corruptions if (root_dir / c).exists()]
        if there and not force:
            if len(there) == len(published.corruptions):
                log(f"{root_dir} already holds {', '.join(there)} ({published.name}): {tar_path} not extracted "
                    "again (--force replaces them)")
                continue
            raise FileExistsError(
                f"{root_dir} already holds {', '.join(there)} but not all of {published.name}'s corruptions "
                f"({', '.join(published.corruptions)}): remove them, or pass --force (force=True) to replace them"
            )
        root_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root_dir, group, log)
        tmp = _temp_dir(root_dir / group)
        n = len(prefix)
        known = set(sum(_corruption_names(), ()))

        def strip(parts: tuple[str, ...], n: int = n, prefix: tuple[str, ...] = prefix) -> tuple[str, ...] | None:
            # only what lies under a corruption folder (below the tar's leading folders)
            if parts[:n] != prefix or len(parts) <= n or parts[n] not in known:
                return None
            return parts[n:]

        try:
            digests = _extract_tar(tar_path, tmp, published, verify, progress, strip)
            if verify:
                _verify_digests(tar_path, published, digests, log)
            else:
                log(f"{tar_path}: checksum not checked (--no-verify)")
            moved = []
            for sub in sorted(tmp.iterdir()):
                if not sub.is_dir():
                    continue
                if (root_dir / sub.name).exists() and not force:
                    log(f"{root_dir / sub.name} exists: kept, the copy in {tar_path} left out (--force replaces it)")
                    continue
                _move_into_place(sub, root_dir / sub.name)
                moved.append(sub.name)
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"extracted {tar_path} to {root_dir}: {', '.join(moved) or 'nothing'}")
    return check_imagenetc_folder(root_dir, corruptions, severities, progress)


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def _list_arg(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.replace(",", " ").split() if v]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta-data",
        description="Get the data sets tta reads, in the layout it reads them in (under $TTA_HOME, "
                    f"now {tta_home()}).",
        epilog="Run `tta-data <subcommand> --help` for the options of each subcommand.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{cifar10,cifar10-c,imagenet-c}")

    def common(p: argparse.ArgumentParser, force_help: str) -> None:
        p.add_argument("--root", metavar="DIR", default=None,
                       help="the folder to write under, a $TTA_HOME (default: $TTA_HOME, now %s)" % tta_home())
        p.add_argument("--no-verify", dest="verify", action="store_false",
                       help="do not check the published checksums (for a modified copy)")
        p.add_argument("--force", action="store_true", help=force_help)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "cifar10", help="CIFAR-10 as PNG files (<root>/data/cifar10/{train,test}/<class>/NNNN.png)",
        description="Write CIFAR-10 as lossless PNG files in the ImageFolder layout tta reads, "
                    "<root>/data/cifar10/{train,test}/<class>/<NNNN>.png, from the published python "
                    f"archive ({CIFAR10_URL}, md5 {CIFAR10_TAR_MD5}), checked against the published md5s.",
    )
    p.add_argument("--source", metavar="PATH", default=None,
                   help=f"a local {CIFAR10_TAR_NAME} or its extracted {CIFAR10_FOLDER_NAME} folder "
                        "(default: download it with torchvision into <root>/downloads/cifar10)")
    p.add_argument("--split", choices=("train", "test", "both"), default="both", help="which split (default: both)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads writing the PNG files (default: 2 on a machine with 2+ cores)")
    common(p, "replace split folders that already exist (default: keep a complete one, refuse an incomplete one)")

    corr_help = ("corruptions to require, comma-separated, or 'all' (default: the 15 benchmark corruptions; "
                 "the 4 held-out ones are checked when present)")
    p = sub.add_parser(
        "cifar10-c", help="check (and extract) CIFAR-10-C for data=cifar10c_disk",
        description="Without --source: say where CIFAR-10-C is published and check <root>/data/CIFAR-10-C "
                    f"if it exists. With --source {CIFAR10C_TAR.name}: check its published checksums, "
                    "extract it to <root>/data/CIFAR-10-C and check the layout. With --source a folder: "
                    "check the layout there (<corruption>.npy uint8 (5N,32,32,3), labels.npy (5N,) in 0..9).",
    )
    p.add_argument("--source", metavar="PATH", default=None,
                   help=f"{CIFAR10C_TAR.name} (from {CIFAR10C_TAR.url}) or the extracted CIFAR-10-C folder")
    p.add_argument("--corruptions", nargs="+", metavar="NAME", default=None, help=corr_help)
    common(p, "replace an existing <root>/data/CIFAR-10-C with the tar's content")

    p = sub.add_parser(
        "imagenet-c", help="check (and extract) ImageNet-C for data=imagenetc",
        description="Without --source: say where ImageNet-C is published and check <root>/data/ImageNet-C "
                    "if it exists. With --source tar files (blur.tar, digital.tar, noise.tar, weather.tar, "
                    "extra.tar; repeat --source): check their published md5s while extracting them to "
                    "<root>/data/ImageNet-C, then check the layout. With --source a folder: check the layout "
                    "there (<corruption>/<severity>/<wnid>/*.JPEG, the 1000 ImageNet-1k wnids).",
    )
    p.add_argument("--source", metavar="PATH", action="append", default=None,
                   help="a published tar file (repeatable) or the extracted ImageNet-C folder")
    p.add_argument("--corruptions", nargs="+", metavar="NAME", default=None, help=corr_help)
    p.add_argument("--severities", nargs="+", metavar="S", default=None,
                   help="severities to check, comma-separated (default: 1,2,3,4,5; fewer is faster)")
    common(p, "replace corruption folders that already exist under <root>/data/ImageNet-C")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``tta-data`` command; returns the exit status (0: the data is usable)."""
    args = _parser().parse_args(argv)
    progress = not args.quiet
    try:
        if args.command == "cifar10":
            if args.workers is not None and args.workers < 1:
                raise ValueError(f"--workers {args.workers}: give 1 or more threads")
            targets = prepare_cifar10(args.root, args.source, args.split, args.verify, force=args.force,
                                      workers=args.workers, progress=progress)
            print("CIFAR-10 is ready:")
            for split, path in targets.items():
                print(f"  {split}: {path}")
            print(cifar10_next_step(targets))
            return 0
        corruptions = _list_arg(args.corruptions)
        if args.command == "cifar10-c":
            report = prepare_cifar10c(args.source, args.root, corruptions, args.verify, force=args.force,
                                      progress=progress)
        else:
            severities = _list_arg(args.severities)
            report = prepare_imagenetc(args.source, args.root, corruptions, severities, args.verify,
                                       force=args.force, progress=progress)
    except DataNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    except (ChecksumError, FileExistsError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"tta-data {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tta-data {args.command}: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
    print(report.summary())
    if report.usable:
        print(f"Next step:\n  {report.next_step()}")
        return 0
    print(f"{report.dataset} is not usable as it is: fix or replace what is listed above and run tta-data "
          "again (or check only what you have: --corruptions ..."
          f"{', --severities ...' if report.dataset == 'ImageNet-C' else ''})", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
