"""``tta-data imagenet-c``: ImageNet-C checked, and extracted, for ``data=imagenetc``.

:func:`check_imagenetc_folder` checks a folder as ``data=imagenetc`` reads it,
``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (image files counted, not opened);
:func:`prepare_imagenetc` also extracts the five published tar files (``noise.tar``,
``blur.tar``, ``weather.tar``, ``digital.tar``, ``extra.tar``: each checked against
its published md5) into ``<root>/data/ImageNet-C``.
"""

from __future__ import annotations

import os
import shlex
import tarfile
from pathlib import Path
from typing import Sequence

from ._files import (
    Log,
    PublishedFile,
    _abs,
    _bar,
    _check_root,
    _count_images,
    _extract_tar,
    _home,
    _move_into_place,
    _safe_parts,
    _temp_folder_for,
)
from .report import (
    DataNotFoundError,
    DataReport,
    _check_severities,
    _corruption_names,
    _wanted_corruptions,
    bench_arg,
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


def _imagenetc_howto(root_dir: Path) -> str:
    files = "\n".join(f"  {p.url}  (md5 {p.md5}): {', '.join(p.corruptions)}" for p in IMAGENETC_TARS.values())
    here = shlex.quote(str(root_dir))
    return (
        f"ImageNet-C is not at {root_dir}. It is published on Zenodo ({IMAGENETC_RECORD}) as five tar files "
        f"(noise, blur, weather and digital hold the 15 benchmark corruptions, extra the 4 held-out ones):\n"
        f"{files}\n"
        "Download them, then either\n"
        f"  tta-data imagenet-c --source blur.tar --source digital.tar --source noise.tar --source weather.tar"
        f"    # checks, extracts to {root_dir}\n"
        f"or extract them yourself (mkdir -p {here} && tar -xf <file>.tar -C {here}) and check the folder with\n"
        f"  tta-data imagenet-c --source {here}\n"
        f"then run: tta-bench data=imagenetc {bench_arg('data.root', root_dir)}"
    )


def check_imagenetc_folder(
    folder: str | os.PathLike,
    corruptions: str | Sequence[str] | None = None,
    severities: int | Sequence[int] | None = None,
    progress: bool = True,
) -> DataReport:
    """Check an ImageNet-C folder as ``data=imagenetc`` reads it: every
    ``<corruption>/<severity>/`` holds the 1000 wnid folders of
    :func:`tta.data.imagenet_wnids`, each with image files (not decoded).

    ``corruptions``: as in :func:`~tta.data.cifar10c.check_cifar10c_folder` (the 4
    extras are checked when their folders exist); ``severities``: which of 1..5 to
    check, an int or a sequence of ints (default all; anything else is refused).
    Counts are per ``<corruption>/<severity>``; the published set has 50000 each.
    Hidden folders, ``__MACOSX`` and ``@eaDir`` are not classes (:func:`tta.data.is_class_folder`,
    as in tta-bench); any other folder that is not a wnid makes the entry bad, as
    ``data.class_index=imagenet`` refuses it."""
    from . import class_folders, imagenet_wnids

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
                subdirs = {name: os.path.join(sdir, name) for name in class_folders(sdir)}
                absent = sorted(wnids - subdirs.keys())
                unknown = sorted(subdirs.keys() - wnids)
                total, empty = 0, []
                for wnid in sorted(wnids & subdirs.keys()):
                    n = _count_images(subdirs[wnid])
                    total += n
                    if not n:
                        empty.append(wnid)
                problems = []
                if absent:
                    problems.append(f"{len(absent)} of the 1000 wnid folders missing (e.g. {', '.join(absent[:3])})")
                if empty:
                    problems.append(f"{len(empty)} wnid folders without images (e.g. {', '.join(empty[:3])})")
                if unknown:
                    problems.append(f"{len(unknown)} folders that are not ImageNet-1k wnids, which "
                                    f"data.class_index=imagenet refuses: {', '.join(unknown[:5])}"
                                    f"{' ...' if len(unknown) > 5 else ''} (move them out)")
                if problems:
                    report.bad[key] = "; ".join(problems)
                else:
                    report.present.append(key)
                    report.counts[key] = total
                    if total != 50000:
                        odd_counts.append(f"{key} ({total})")
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
    corruptions: str | Sequence[str] | None = None,
    severities: int | Sequence[int] | None = None,
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
    _wanted_corruptions(corruptions)
    _check_severities(severities)
    _check_root(root)
    if sources is None or (not isinstance(sources, (str, os.PathLike)) and not sources):
        root_dir = _home(root) / "data" / "ImageNet-C"
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
    if folders:  # checked in place: no $TTA_HOME needed
        if len(paths) > 1:
            raise ValueError(f"--source {folders[0]} is a folder: give one extracted folder, or tar files only")
        report = check_imagenetc_folder(folders[0], corruptions, severities, progress)
        report.notes.append("no checksums are published for the extracted files (only for the tar files)")
        return report
    root_dir = _home(root) / "data" / "ImageNet-C"
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
        n = len(prefix)
        known = set(sum(_corruption_names(), ()))

        def strip(parts: tuple[str, ...], n: int = n, prefix: tuple[str, ...] = prefix) -> tuple[str, ...] | None:
            # only what lies under a corruption folder (below the tar's leading folders)
            if parts[:n] != prefix or len(parts) <= n or parts[n] not in known:
                return None
            return parts[n:]

        with _temp_folder_for(root_dir / group, log) as tmp:  # also creates root_dir
            _extract_tar(tar_path, tmp, published, verify, progress, log, strip)
            moved = []
            for sub in sorted(tmp.iterdir()):
                if not sub.is_dir():
                    continue
                if (root_dir / sub.name).exists() and not force:
                    log(f"{root_dir / sub.name} exists: kept, the copy in {tar_path} left out (--force replaces it)")
                    continue
                _move_into_place(sub, root_dir / sub.name)
                moved.append(sub.name)
        log(f"extracted {tar_path} to {root_dir}: {', '.join(moved) or 'nothing'}")
    return check_imagenetc_folder(root_dir, corruptions, severities, progress)
