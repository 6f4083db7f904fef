"""ImageNet-sized image folders made from the shared CIFAR-10 images, upsampled.

Speed measurements of the ImageNet path (224-px decoding, 1000-class labels, the
ImageNet-C folder layout) need image files of that size, and no ImageNet is
shared here. These builders write the shared CIFAR-10 test images, upsampled,
as JPEG files in ImageNet's layouts, each class folder named after an
ImageNet-1k wnid of a like class, so ``class_index: auto`` reads ImageNet labels
and a 1000-class model accepts them:

- :func:`write_image_folder`: ``<root>/<wnid>/*.JPEG`` (``data=imagefolder_c``);
- :func:`write_imagenet_c_tree`: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``
  (``data=imagenetc``), each image corrupted with :mod:`tta.corruptions` as the
  published set is (so the files decode like corrupted ones).

    TTA_HOME=../shared python -m benchmarks.upsampled_images /tmp/inet224 --per-class 26
    TTA_HOME=../shared python -m benchmarks.upsampled_images /tmp/inetc224 --per-class 26 \\
        --corruptions gaussian_noise fog

The images are the same few thousand small pictures at a larger size, not
ImageNet: only timings and memory mean anything on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from tta.corruptions import corrupt
from tta.data import cifar10_dir, list_image_folder

#: An ImageNet-1k wnid per CIFAR-10 class (airliner, beach wagon, brambling, tabby,
#: gazelle, golden retriever, bullfrog, sorrel, container ship, trailer truck).
CIFAR10_WNIDS = {
    "airplane": "n02690373", "automobile": "n02814533", "bird": "n01530575", "cat": "n02123045",
    "deer": "n02423022", "dog": "n02099601", "frog": "n01641577", "horse": "n02389026",
    "ship": "n03095699", "truck": "n04467665",
}

#: JPEG quality of the written files (ImageNet's own files vary around it).
QUALITY = 90


def upsampled_cifar10(per_class: int, size: int, split: str = "test") -> tuple[torch.Tensor, list[str], list[str]]:
    """The first ``per_class`` images of each CIFAR-10 class (sorted file names),
    upsampled (bicubic) to ``size`` px: uint8 (N, 3, size, size), each image's
    wnid, and its file stem."""
    files, labels, classes = list_image_folder(cifar10_dir(split))
    picked: dict[int, list[Path]] = {}
    for f, label in zip(files, labels):
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(f)
    arrays, wnids, stems = [], [], []
    for label, chosen in sorted(picked.items()):
        for f in chosen:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)))
            wnids.append(CIFAR10_WNIDS[classes[label]])
            stems.append(f"{classes[label]}_{f.stem}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, wnids, stems


def _save(images: torch.Tensor, wnids: Sequence[str], stems: Sequence[str], folder: Path) -> int:
    for img, wnid, stem in zip(images, wnids, stems):
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / wnid / f"{stem}.JPEG", quality=QUALITY)
    return len(images)


def write_image_folder(root: str | Path, per_class: int, size: int = 256, split: str = "test") -> int:
    """Write ``per_class`` upsampled CIFAR-10 images per class as
    ``root/<wnid>/<class>_<stem>.JPEG`` (``size`` px square; 256 makes
    ``data=imagefolder_c``'s 0.875 centre crop a 224-px input, as on ImageNet's
    validation set). Returns the number of files written."""
    images, wnids, stems = upsampled_cifar10(per_class, size, split)
    return _save(images, wnids, stems, Path(root))


def write_imagenet_c_tree(root: str | Path, corruptions: Sequence[str], per_class: int, *, severity: int = 5,
                          size: int = 224, split: str = "test", seed: int = 0, chunk: int = 64) -> int:
    """Write an ImageNet-C tree ``root/<corruption>/<severity>/<wnid>/*.JPEG`` of
    ``per_class`` upsampled CIFAR-10 images per class, each corruption rendered
    by :func:`tta.corruptions.corrupt` (``chunk`` images at a time, seeded).
    Returns the number of files written."""
    images, wnids, stems = upsampled_cifar10(per_class, size, split)
    written = 0
    for i, name in enumerate(corruptions):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        folder = Path(root) / name / str(severity)
        for s in range(0, len(images), chunk):
            x = images[s:s + chunk].float().div_(255)
            y = corrupt(x, name, severity, preset="imagenet", generator=g)
            written += _save(y.mul(255).round_().clamp_(0, 255).to(torch.uint8), wnids[s:s + chunk],
                             stems[s:s + chunk], folder)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder to write (created; never the shared data folder)")
    ap.add_argument("--per-class", type=int, default=26, help="images per class (10 classes)")
    ap.add_argument("--size", type=int, default=None, help="side in px (default 256 for a folder, 224 for a tree)")
    ap.add_argument("--corruptions", nargs="+", default=None, help="write an ImageNet-C tree of these")
    ap.add_argument("--severity", type=int, default=5)
    args = ap.parse_args()
    if args.corruptions:
        n = write_imagenet_c_tree(args.root, args.corruptions, args.per_class, severity=args.severity,
                                  size=args.size or 224)
    else:
        n = write_image_folder(args.root, args.per_class, size=args.size or 256)
    print(f"{n} images written under {args.root}")


if __name__ == "__main__":
    main()
