"""A small ``TTA_HOME`` for a device machine: what ``benchmarks.gpu_check`` and the
``cuda`` tests read, copied from the shared folder into a folder that can travel
with the working tree (the shared folder beside the checkout does not).

    TTA_HOME=../shared python -m benchmarks.device_home .device_home   # then carry it

It holds the first ``--per-class`` CIFAR-10 test images of each class (160: the
data-path section's stream needs that many), the ResNet-20 checkpoint and the
frost textures of the corruptions: about 5 MB. Name the folder in
``.git/info/exclude`` so that git ignores it, carry it, and run with
``TTA_HOME=.device_home`` there (see benchmarks/README.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tta.data import cifar10_dir, list_image_folder
from tta.paths import tta_home

#: The shared ResNet-20 checkpoint (``cifar10_resnet20``: the CIFAR speed tables,
#: the cuda tests).
CHECKPOINTS = ("resnet20-12fca82f.th",)


def write_device_home(dst: str | Path, per_class: int = 160) -> int:
    """Copy the images, checkpoint and textures into ``dst`` (a TTA_HOME layout);
    returns the number of files copied."""
    dst, src = Path(dst), tta_home()
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst} is TTA_HOME itself; give a new folder")
    files, labels, classes = list_image_folder(cifar10_dir("test"))
    counts: dict[int, int] = {}
    copied = 0
    for f, label in zip(files, labels):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] <= per_class:
            target = dst / "data" / "cifar10" / "test" / classes[label] / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            copied += 1
    for name in CHECKPOINTS:
        (dst / "models" / "cifar10").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "models" / "cifar10" / name, dst / "models" / "cifar10" / name)
        copied += 1
    frost = src / "data" / "imagenet-c-frost"
    shutil.copytree(frost, dst / "data" / "imagenet-c-frost", dirs_exist_ok=True)
    return copied + sum(1 for p in frost.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst", help="folder to write (inside the checkout, ignored by git)")
    ap.add_argument("--per-class", type=int, default=160)
    args = ap.parse_args()
    n = write_device_home(args.dst, args.per_class)
    size = sum(p.stat().st_size for p in Path(args.dst).rglob("*") if p.is_file())
    print(f"{n} files, {size / 2**20:.1f} MiB in {args.dst}")


if __name__ == "__main__":
    main()
