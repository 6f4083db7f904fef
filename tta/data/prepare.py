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

The command line lives here; the work in the modules named for what they hold:
:mod:`tta.data.cifar10` (with :mod:`tta.data.cifar10_archive`, the published
archive), :mod:`tta.data.cifar10c`, :mod:`tta.data.imagenetc`, :mod:`tta.data.report`
(:class:`DataReport`) and :mod:`tta.data._files` (checksums, atomic folders, tar
extraction). Their public names are importable from here too (to change one, as
a test does, set it in the module that holds it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._files import ChecksumError, PublishedFile, _home_or_none
from .cifar10 import cifar10_next_step, prepare_cifar10
from .cifar10_archive import CIFAR10_CLASSES, CIFAR10_FOLDER_NAME, CIFAR10_TAR_MD5, CIFAR10_TAR_NAME, CIFAR10_URL
from .cifar10c import CIFAR10C_TAR, check_cifar10c_folder, prepare_cifar10c
from .imagenetc import check_imagenetc_folder, prepare_imagenetc
from .report import DataNotFoundError, DataReport, severities_from_text

# Not used here: the other published records, importable from here as before the split.
from ._files import Log  # noqa: F401
from .cifar10 import MARKER  # noqa: F401
from .cifar10_archive import CIFAR10_FILE_MD5, CIFAR10_META, CIFAR10_PER_CLASS, CIFAR10_SPLIT_FILES  # noqa: F401
from .cifar10c import CIFAR10C_RECORD  # noqa: F401
from .imagenetc import IMAGENETC_RECORD, IMAGENETC_TARS  # noqa: F401
from .report import SEVERITIES  # noqa: F401

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


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------


def _list_arg(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.replace(",", " ").split() if v]


def _home_text() -> str:
    """``$TTA_HOME`` for the help: where it points, or that it is set but empty (the
    parser is built for every call, --help and --root DIR included: it must not fail
    there; a command that needs $TTA_HOME says so when it does)."""
    home = _home_or_none()
    return f"now {home}" if home is not None else "now set but empty: pass --root DIR"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tta-data",
        description="Get the data sets tta reads, in the layout it reads them in (under $TTA_HOME, "
                    f"{_home_text()}).",
        epilog="Run `tta-data <subcommand> --help` for the options of each subcommand.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{cifar10,cifar10-c,imagenet-c}")

    def common(p: argparse.ArgumentParser, force_help: str) -> None:
        p.add_argument("--root", metavar="DIR", default=None,
                       help="the folder to write under, a $TTA_HOME (default: $TTA_HOME, %s)" % _home_text())
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
            texts = _list_arg(args.severities)
            severities = severities_from_text(texts) if texts else None
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
