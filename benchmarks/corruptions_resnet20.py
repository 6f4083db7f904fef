"""Source ResNet-20 error on each CIFAR-preset corruption: tta's rendering vs the
original code's (issue 4: they should agree within 2 points per corruption).

The original is ``make_cifar_c.py``'s algorithms run through
``benchmarks/corruption_reference.py`` (the ``imagenet_c`` package's helpers with the
CIFAR-10-C severity tables; needs the dev extra plus ImageMagick). Both render the
same shared test images at severity 5, each with its own seeded randomness.

    TTA_HOME=../shared python -m benchmarks.corruptions_resnet20 --num-images 10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import tta
from tta.corruptions import ALL_NAMES, NAMES, corrupt
from tta.corruptions._frost import default_frost_dir
from tta.data import cifar10_dir, load_image_folder

from benchmarks.common import error_rate, write_json
from benchmarks.corruption_reference import reference_corrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10000)
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--corruptions", nargs="+", default=list(NAMES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y = load_image_folder(cifar10_dir("test"), num_images=args.num_images, seed=0)
    model = tta.load_model("cifar10_resnet20")
    frost = default_frost_dir()
    rows = {"clean": (error_rate(model, x, y), None)}
    uint8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for name in tqdm(args.corruptions, desc="corruptions"):
        # seeded by the corruption's place in NAMES (not in --corruptions): a rerun of
        # one corruption draws what the full table drew
        i = ALL_NAMES.index(name)
        gen = torch.Generator().manual_seed(i)
        ours = torch.cat([corrupt(x[j:j + 1000], name, args.severity, preset="cifar", generator=gen)
                          for j in range(0, len(x), 1000)])
        t0 = time.perf_counter()
        ref = reference_corrupt(uint8, name, args.severity, "cifar", frost, seed=i)
        ref_s = time.perf_counter() - t0
        ref_x = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 255
        rows[name] = (error_rate(model, ours, y), error_rate(model, ref_x, y))
        print(f"{name}: tta {rows[name][0]:.2f}  original {rows[name][1]:.2f}  (original took {ref_s:.0f} s)",
              flush=True)

    print(f"\n| corruption | tta | original | difference |\n|---|---:|---:|---:|")
    for name, (ours_e, ref_e) in rows.items():
        if ref_e is None:
            print(f"| {name} | {ours_e:.2f} | {ours_e:.2f} | – |")
        else:
            print(f"| {name} | {ours_e:.2f} | {ref_e:.2f} | {ours_e - ref_e:+.2f} |")
    diffs = [abs(a - b) for a, b in rows.values() if b is not None]
    means = [np.mean([v[k] for n, v in rows.items() if v[1] is not None]) for k in (0, 1)]
    print(f"| mean of {len(diffs)} | {means[0]:.2f} | {means[1]:.2f} | max abs {max(diffs):.2f} |")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
