"""The collapse guard on streams built to break adaptation, and on the benchmark
streams where it must stay quiet.

Streams (shared ResNet-20, shared CIFAR-10 JPEG test images):

- ``benchmark``: the 8-corruption severity-5 stream of ``methods_cifar10c.py``
  (``--num-images`` per corruption, batch 200), every entropy method at its
  CIFAR-10 setting (``preset="cifar10"``, as everywhere in this script): how often
  the guard fires where nothing is wrong.
- ``one_class``: the 1000 test images of one class (cat), batch 64, Tent: test-batch
  statistics remove the class signal itself.
- ``tent_lr0.05``: 2000 clean test images, batch 64, Tent at lr 0.05 (Adam): the
  step size destroys the model while its predictions stay spread out.
- ``sar_lr0.5``: the benchmark stream, SAR at lr 0.5 (Adam).

    TTA_HOME=../shared python -m benchmarks.guard_cifar10c --num-images 1000

Prints a Markdown table: error without and with ``collapse_guard=True``, resets and
fallback batches.
"""

from __future__ import annotations

import argparse

import torch

import tta
from tta.data import cifar10_dir, load_image_folder

from benchmarks.common import EIGHT, method_table_stream, machine

#: the methods of the ``benchmark`` stream
BENCHMARK_METHODS = ("tent", "eta", "sar", "deyo")


def wrap(name, **kw):
    """A fresh shared ResNet-20 under method ``name`` at its CIFAR-10 setting."""
    return tta.wrap(tta.load_model("cifar10_resnet20"), name, preset="cifar10", **kw)


def run(method, batches):
    wrong = total = 0
    for x, y in batches:
        wrong += (method(x).argmax(1) != y).sum().item()
        total += y.numel()
    guard = method.guard
    return 100.0 * wrong / total, (guard.num_collapses if guard else 0), getattr(guard, "num_fallback_batches", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", nargs="+", default=["benchmark", "one_class", "tent_lr0.05", "sar_lr0.5"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    domains = method_table_stream(EIGHT, args.num_images, 0)
    benchmark = [(x[i:i + 200], y[i:i + 200]) for _, x, y in domains for i in range(0, x.shape[0], 200)]
    x, y = load_image_folder(cifar10_dir("test"), num_images=None, seed=0)
    cat = (y == 3).nonzero().squeeze(1)
    one_class = [(x[cat[i:i + 64]], y[cat[i:i + 64]]) for i in range(0, len(cat), 64)]
    clean = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 2000, 64)]
    cases = {
        "benchmark": [(name, {}, benchmark) for name in BENCHMARK_METHODS],
        "one_class": [("tent", {}, one_class)],
        "tent_lr0.05": [("tent", dict(optimizer="adam", lr=0.05), clean)],
        "sar_lr0.5": [("sar", dict(optimizer="adam", lr=0.5), benchmark)],
    }
    print("| stream | method | norm | plain | guarded | resets | fallback batches | batches |")
    print("|---|---|---|---|---|---|---|---|")
    for stream in args.streams:
        for name, kw, batches in cases[stream]:
            norm, _, _ = run(wrap("norm"), batches)
            torch.manual_seed(0)
            plain, _, _ = run(wrap(name, **kw), batches)
            torch.manual_seed(0)
            guarded, resets, fallbacks = run(wrap(name, collapse_guard=True, **kw), batches)
            print(f"| {stream} | {name} | {norm:.1f} | {plain:.1f} | {guarded:.1f} | {resets} | {fallbacks} | {len(batches)} |",
                  flush=True)
    print(f"\n{machine(args.threads)}")


if __name__ == "__main__":
    main()
