"""Overhead of the ``tta-bench`` runner over a bare loop calling the wrapped model.

Both loops see the same stream (same config, seed, images, corruption noise):

* runner: :func:`tta.bench.run_benchmark` (progress bar, per-step records, metrics,
  ECE, writing results); its timed loop (``seconds.loop``) covers loading,
  on-the-fly corruption, adaptation and bookkeeping, not model loading or writing.
* bare: the same batch loader and corruption renderer feeding ``method(x)`` and
  nothing else;
* bare, pre-rendered: the corrupted batches materialised beforehand, so only
  ``method(x)`` is timed (the adaptation cost alone).

Each variant runs ``--repeats`` times alternately on a fresh model; the best time
counts (the machine is shared, so the minimum is the least disturbed)::

    TTA_HOME=../shared python -m benchmarks.runner_overhead --method tent --num-images 256

The method runs with the runner's preset for the data (``method.preset=auto``: the
CIFAR-10 settings here) in all three loops.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timezone

import torch

from tta.bench import compose_config, run_benchmark
from tta.bench.render import BatchRenderer
from tta.bench.runner import setup, wrap_method
from tta.bench.settings import read_config
from tta.bench.stream import open_stream

from benchmarks.common import cpu_model


def _setup(cfg):
    """Fresh model + method and the runner's loader/renderer for ``cfg``, through
    the runner's own stages."""
    config = read_config(cfg)
    job = setup(config)
    stream, loader = open_stream(config.data, config.scenario, config.run, job.device, input_size=job.input_size,
                                 model_classes=getattr(job.model, "num_classes", None), model_name=config.model.name)
    loader.prepare()
    render = BatchRenderer(stream, seed=config.run.seed, preset=config.data.preset, input_size=job.input_size)
    method, _, _ = wrap_method(config, job, [])
    return method, loader, render, len(stream)


def bare_loop(cfg) -> tuple[float, float, int]:
    """Seconds for loader -> renderer -> method(x) over the stream, seconds inside
    method(x), and images."""
    method, loader, render, n = _setup(cfg)
    in_model = 0.0
    t0 = time.perf_counter()
    for batch in loader:
        if batch.reset:
            method.reset()
        x = render(batch)
        t1 = time.perf_counter()
        method(x)
        in_model += time.perf_counter() - t1
    return time.perf_counter() - t0, in_model, n


def prerendered_loop(cfg) -> tuple[float, int]:
    """Seconds for method(x) alone over batches corrupted beforehand."""
    method, loader, render, n = _setup(cfg)
    batches = [(b.reset, render(b)) for b in loader]
    t0 = time.perf_counter()
    for reset, x in batches:
        if reset:
            method.reset()
        method(x)
    return time.perf_counter() - t0, n


def runner_loop(cfg) -> tuple[float, float, int]:
    """Seconds of the runner's timed loop, seconds inside method(x), images."""
    with tempfile.TemporaryDirectory() as out:
        res = run_benchmark(cfg, out)
    return res["seconds"]["loop"], res["seconds"]["adapt"], res["num_images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="tent")
    p.add_argument("--num-images", type=int, default=256, help="images per domain")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--corruptions", default="gaussian_noise,contrast,brightness,jpeg_compression")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"method={args.method}", f"data.corruptions=[{args.corruptions}]",
                 f"data.num_images={args.num_images}", f"run.batch_size={args.batch_size}",
                 "run.device=cpu", "run.plot=false", "run.skip_existing=false", "run.progress=true",
                 f"run.num_threads={args.threads}"]
    cfg = compose_config(overrides)
    best = {"runner": float("inf"), "bare": float("inf"), "prerendered": float("inf")}
    # Time outside method(x) (loading, corrupting, bookkeeping): on a shared machine
    # the model's own time swings by tens of percent between runs, so the runner's
    # overhead is measured as the difference of this, relative to the bare loop.
    outside = {"runner": float("inf"), "bare": float("inf")}
    n = 0
    for _ in range(args.repeats):
        s, in_model, n = runner_loop(cfg)
        best["runner"] = min(best["runner"], s)
        outside["runner"] = min(outside["runner"], s - in_model)
        s, in_model, _ = bare_loop(cfg)
        best["bare"] = min(best["bare"], s)
        outside["bare"] = min(outside["bare"], s - in_model)
        best["prerendered"] = min(best["prerendered"], prerendered_loop(cfg)[0])
    ips = {k: n / v for k, v in best.items()}
    overhead = 100.0 * (best["runner"] / best["bare"] - 1.0)
    extra = 100.0 * (outside["runner"] - outside["bare"]) / best["bare"]
    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}")
    print(f"cpu: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"stream: {args.method} on cifar10c [{args.corruptions}] severity 5, {args.num_images} images/domain, "
          f"batch {args.batch_size}, {n} images, best of {args.repeats}")
    print("| loop | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| runner (tta-bench loop: load + corrupt + adapt + metrics) | {best['runner']:.2f} | {ips['runner']:.0f} |")
    print(f"| bare loop (same loader + corrupt + method(x)) | {best['bare']:.2f} | {ips['bare']:.0f} |")
    print(f"| bare, pre-rendered batches (method(x) only) | {best['prerendered']:.2f} | {ips['prerendered']:.0f} |")
    print(f"time outside method(x): runner {outside['runner']:.2f} s, bare {outside['bare']:.2f} s")
    print(f"runner overhead vs bare loop, wall time: {overhead:+.1f}%")
    print(f"runner overhead vs bare loop, extra time outside method(x) / bare loop time: {extra:+.1f}%")


if __name__ == "__main__":
    main()
