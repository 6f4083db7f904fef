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
import os
from concurrent.futures import ThreadPoolExecutor
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


def upsampled_cifar10(per_class: int, size: int, split: str = "test", wnids: bool = True
                      ) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first ``per_class`` images of each CIFAR-10 class (sorted file names),
    upsampled (bicubic) to ``size`` px: uint8 (N, 3, size, size), each image's
    folder name (its class's wnid, or with ``wnids=False`` its CIFAR-10 class
    name, for 10-class models), and its file stem."""
    files, labels, classes = list_image_folder(cifar10_dir(split))
    picked: dict[int, list[Path]] = {}
    for f, label in zip(files, labels):
        if len(picked.setdefault(label, [])) < per_class:
            picked[label].append(f)
    arrays, names, stems = [], [], []
    for label, chosen in sorted(picked.items()):
        for f in chosen:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)))
            names.append(CIFAR10_WNIDS[classes[label]] if wnids else classes[label])
            stems.append(f"{classes[label]}_{f.stem}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, names, stems


def _save(images: torch.Tensor, classes: Sequence[str], stems: Sequence[str], folder: Path) -> int:
    for name in set(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / classes[i] / f"{stems[i]}.JPEG",
                                                                 quality=QUALITY)

    # Threads: Pillow encodes without the GIL (a GPU machine's many cores write
    # a few thousand files in a second or two).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        list(ex.map(save, range(len(images))))
    return len(images)


def write_image_folder(root: str | Path, per_class: int, size: int = 256, split: str = "test",
                       wnids: bool = True) -> int:
    """Write ``per_class`` upsampled CIFAR-10 images per class as
    ``root/<wnid>/<class>_<stem>.JPEG`` (``size`` px square; 256 makes
    ``data=imagefolder_c``'s 0.875 centre crop a 224-px input, as on ImageNet's
    validation set; ``wnids=False``: class-name folders). Returns the number of
    files written."""
    images, folders, stems = upsampled_cifar10(per_class, size, split, wnids)
    return _save(images, folders, stems, Path(root))


def write_imagenet_c_tree(root: str | Path, corruptions: Sequence[str], per_class: int, *, severity: int = 5,
                          size: int = 224, split: str = "test", seed: int = 0, chunk: int = 64,
                          device: str = "cpu", wnids: bool = True) -> int:
    """Write an ImageNet-C tree ``root/<corruption>/<severity>/<wnid>/*.JPEG`` of
    ``per_class`` upsampled CIFAR-10 images per class, each corruption rendered
    by :func:`tta.corruptions.corrupt` on ``device`` (``chunk`` images at a time,
    seeded; ``wnids=False``: class-name folders). Returns the number of files
    written."""
    images, folders, stems = upsampled_cifar10(per_class, size, split, wnids)
    written = 0
    for i, name in enumerate(corruptions):
        g = torch.Generator(device=device).manual_seed(seed * 1000 + i)
        folder = Path(root) / name / str(severity)
        rendered = []
        for s in range(0, len(images), chunk):
            x = images[s:s + chunk].to(device).float().div_(255)
            y = corrupt(x, name, severity, generator=g)  # severity tables by image size
            rendered.append(y.mul_(255).round_().clamp_(0, 255).to("cpu", torch.uint8))
        written += _save(torch.cat(rendered), folders, stems, folder)
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
