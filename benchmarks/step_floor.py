"""A method step against its floor: each method as a multiple of plain inference, beside
a plain implementation of the published Tent algorithm, in one process.

The floor of a Tent step is one train-mode forward and one backward through the
network; ``tent-reference`` is that, written as the paper's reference code does
(train-mode BatchNorm without running statistics, the norm affines in Adam,
``-(p * log p).sum(1).mean()``), with nothing of tta's. Every runner is interleaved
with plain eval-mode inference repeat by repeat; the median of the per-repeat ratios
is reported, and the minor page faults per call (what glibc's malloc costs when it
hands freed activations back to the kernel; see ``tta/_host_memory.py``).

    TTA_HOME=../shared python -m benchmarks.step_floor --threads 1
    TTA_HOME=../shared TTA_HOST_ALLOCATOR=default python -m benchmarks.step_floor --threads 1

The reference loop runs first, before any tta method has taken a step: with the
default allocator setting the first method step changes malloc for the whole process,
so the reference's figure is then also under the changed malloc (run with
``TTA_HOST_ALLOCATOR=default`` for the reference under glibc's defaults).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

import tta

from benchmarks.common import machine, write_json
from benchmarks.speed import load

METHODS = ["norm", "tent", "eta", "deyo", "sar"]


def tent_reference(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The published Tent step, plainly: BatchNorm in train mode on batch statistics
    only, its affine parameters in Adam (lr 1e-3, the CIFAR setting), entropy loss."""
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step(x: Tensor) -> Tensor:
        logits = model(x)
        loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return logits.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = load(args.model)
    x = torch.rand(args.batch_size, 3, *source.input_size)

    plain_model = copy.deepcopy(source).eval()

    @torch.no_grad()
    def plain(batch: Tensor) -> Tensor:
        return plain_model(batch)

    runners: dict[str, Callable[[Tensor], Tensor]] = {"plain": plain, "tent-reference": tent_reference(copy.deepcopy(source))}
    for name in ("plain", "tent-reference"):  # warm-up before any tta step (see the module docstring)
        runners[name](x)
    preset = dict(preset="cifar10") if args.model.startswith("cifar10") else {}
    for name in args.methods:
        runners[name] = tta.wrap(copy.deepcopy(source), name, **preset)
        runners[name](x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[int]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print("| runner | ms per batch | x plain inference | minor page faults per call |")
    print("|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        rows[name] = dict(ms=1e3 * statistics.median(ts), ratio=ratio, faults=statistics.median(faults[name]))
        print(f"| {name} | {rows[name]['ms']:.0f} | {ratio:.2f} | {rows[name]['faults']:.0f} |")
    print(f"\n{args.model}, batch {args.batch_size}, {args.repeats} repeats; {machine(args.threads)}")
    if args.json:
        write_json(args.json, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
