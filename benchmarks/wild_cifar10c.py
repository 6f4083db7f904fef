"""DeYO's wild settings on a batch-independent model: batch size 1, online label
shift and mixed domains, through the tta-bench runner.

    TTA_HOME=../shared python -m benchmarks.wild_cifar10c --model zoo_resnet26_gn --num-images 1000

For each scenario and method it composes the tta-bench config (``conf/``) with the
given overrides and runs it in this process, as ``tta-bench`` would: the same
seeded stream (``--num-images`` test images of each of the 8 severity-5 corruptions
of ``methods_cifar10c.py``) for every method. Scenarios:

- ``label_shift``: continual, batch 64, classes in Dirichlet(0.1)-ordered runs
  within each domain (the DeYO/SAR online-imbalanced stream);
- ``mixed_domains``: all corruptions shuffled into one stream, batch 64;
- ``batch_size_1``: continual, one image per step.

Optimiser settings are the methods' ``preset="cifar10"`` (the published CIFAR
settings, Adam 1e-3 for the entropy family; tta-bench's ``method.preset=auto``),
with the learning rate scaled linearly by batch/64 for batch size 1, as SAR's code
does for small batches, so that each image moves the weights by about as much as in
a batch of 64.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import tta
from tta.bench.config import compose_config
from tta.bench.runner import run_benchmark

from benchmarks.common import EIGHT, machine, write_json

SCENARIOS = ("label_shift", "mixed_domains", "batch_size_1")
METHODS = ("source", "tent", "eata", "sar", "deyo")


def overrides(model: str, method: str, scenario: str, num_images: int, seed: int,
              settings: list[str] = (), severity: int = 5) -> list[str]:
    batch = 1 if scenario == "batch_size_1" else 64
    over = [f"model={model}", f"method={method}", f"scenario={scenario}", f"run.batch_size={batch}",
            f"data.corruptions=[{','.join(EIGHT)}]", f"data.num_images={num_images}", f"data.severity={severity}",
            f"run.seed={seed}", "run.device=cpu", "run.plot=false", "run.progress=false",
            "run.skip_existing=false", "run.checkpoint_minutes=0"]
    preset = tta.method_presets(method)["cifar10"]
    if batch != 64 and "lr" in preset:
        # the batch_size_1 scenario drops the batch-200 preset: keep it, with its lr scaled
        over += ["method.preset=cifar10", f"method.lr={preset['lr'] * batch / 64}"]
    return over + [f"method.{kv}" for kv in settings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo_resnet26_gn", help="a conf/model option")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="method options for every method of the run, e.g. affinity=rbf (lame)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios:
            for method in args.methods:
                cfg = compose_config(overrides(args.model, method, scenario, args.num_images, args.seed, args.set,
                                               args.severity))
                t0 = time.perf_counter()
                res = run_benchmark(cfg, Path(tmp) / f"{scenario}-{method}")
                results.setdefault(scenario, {})[method] = dict(
                    mean_error=res["mean_error"], error=res["error"], seconds=time.perf_counter() - t0)
                print(f"{scenario} {method}: {res['mean_error']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\n| scenario | {' | '.join(args.methods)} |")
    print("|" + "---|" * (len(args.methods) + 1))
    for scenario, row in results.items():
        print(f"| {scenario} | " + " | ".join(f"{row[m]['mean_error']:.1f}" for m in args.methods) + " |")
    print(f"\n{args.model}, {args.num_images} images per corruption, severity {args.severity}; "
          f"{machine(args.threads)}")
    if args.json:
        write_json(args.json, dict(args=vars(args), results=results))


if __name__ == "__main__":
    main()
