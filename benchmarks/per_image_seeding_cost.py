"""Cost of per-image corruption seeding: ``corrupt`` with one generator per image
(what tta-bench renders with, so an image's corruption does not depend on its
batch) against one generator for the batch, interleaved repeats in one process,
median of the per-repeat time ratios; plus the per-image cost against a tent step
of ResNet-20 on the same batch (CIFAR case).

    TTA_HOME=../shared python -m benchmarks.per_image_seeding_cost --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import tta
from tta.corruptions import NAMES, corrupt
from tta.data import cifar10_dir, load_image_folder


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", default=",".join(NAMES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="cifar:32:200,imagenet:224:64", help="preset:size:batch,...")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clean, _ = load_image_folder(cifar10_dir("test"), num_images=200, seed=0)
    tent = tta.wrap(tta.load_model("cifar10_resnet20"), "tent")
    print("| preset | px | batch | corruption | per-image / one generator | per-image seeding / tent step |")
    print("|---|---:|---:|---|---:|---:|")
    for case in args.cases.split(","):
        preset, size, batch = case.split(":")
        size, batch = int(size), int(batch)
        x = clean[:batch]
        if size != 32:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        t_step = statistics.median(timed(lambda: tent(clean[:batch])) for _ in range(args.repeats)) \
            if size == 32 else None
        ratios, extra = [], []
        for name in args.names.split(","):
            one = lambda: corrupt(x, name, 5, preset=preset, generator=torch.Generator().manual_seed(0))
            per = lambda: corrupt(x, name, 5, preset=preset,
                                  generator=[torch.Generator().manual_seed(i) for i in range(batch)])
            one(), per()  # warm caches (kernels, frost textures)
            pairs = [(timed(one), timed(per)) for _ in range(args.repeats)]
            r = statistics.median(b / a for a, b in pairs)
            dt = statistics.median(b - a for a, b in pairs)
            ratios.append(r)
            extra.append(dt)
            vs_step = f"{dt / t_step:.3f}" if t_step else "–"
            print(f"| {preset} | {size} | {batch} | {name} | {r:.2f}x | {vs_step} |", flush=True)
        vs = f"{statistics.median(extra) / t_step:.3f}" if t_step else "–"
        print(f"| {preset} | {size} | {batch} | **median** | **{statistics.median(ratios):.2f}x** | **{vs}** |")


if __name__ == "__main__":
    main()
