"""What the fault-safety copy (``tta.methods.optim.StepUndo``, taken at every call)
costs, as a fraction of one Tent step, timed in one process.

    TTA_HOME=../shared python -m benchmarks.step_undo_cost --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import tta
from tta.methods.optim import StepUndo

from benchmarks.common import machine

CASES = [("cifar10_resnet20", 200, 32), ("timm:resnet50", 16, 128), ("timm:vit_small_patch16_224", 16, 224)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | batch | side | tent step ms | StepUndo ms | share of the step |")
    print("|---|---|---|---|---|---|")
    for name, batch, side in CASES:
        model = tta.load_model(name, **({} if name.startswith("cifar") else {"pretrained": False}))
        method = tta.wrap(model, "tent")
        x = torch.rand(batch, 3, side, side)
        method(x)  # optimizer state exists from here on
        step, undo = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            method(x)
            step.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(20):
                StepUndo(method)
            undo.append((time.perf_counter() - t0) / 20)
        s, u = min(step), min(undo)
        print(f"| {name} | {batch} | {side} | {1e3 * s:.1f} | {1e3 * u:.3f} | {100 * u / s:.2f}% |")
    print(f"\n{machine(args.threads)}")


if __name__ == "__main__":
    main()
