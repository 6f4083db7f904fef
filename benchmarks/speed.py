"""Speed of every method as a multiple of plain inference, measured in one process.

For each method: images/s of ``adapted(x)`` (predict + adapt), its ratio to plain
eval-mode ``model(x)`` under ``torch.no_grad()`` on the same batch, and peak memory.
Methods and the plain baseline are interleaved repeat by repeat and the median of
the per-repeat ratios is reported, so machine noise hits both sides alike.

    TTA_HOME=../shared python -m benchmarks.speed                       # ResNet-20, CPU
    python -m benchmarks.speed --model timm:resnet50 --batch-size 64 --device cuda

On a CIFAR-10 model every method runs with ``preset="cifar10"`` (the published CIFAR
settings, ``tta.method_presets``), elsewhere with its defaults. ``--amp``,
``--channels-last`` and ``--compile`` apply to plain inference too (autocast,
memory format, ``torch.compile``), so a ratio compares like with like; the plain
row's images/s of each setting compares the settings.

Peak memory: what one call allocates beyond what was live before it (model and
data excluded): CUDA ``max_memory_allocated`` minus ``memory_allocated``; on the
CPU the peak of live tensor memory in one call, from the profiler's allocation
events.

:func:`measure` is the whole measurement as a function (``benchmarks.gpu_check``
calls it); a method that fails to build or run is reported with its error
instead of ending the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from typing import Callable

import torch

import tta

from benchmarks.common import cpu_model, sync, write_json

METHODS = ["norm", "tent", "eta", "eata", "sar", "deyo", "cotta", "rmt", "roid", "cmf", "santa", "rotta",
           "adacontrast", "lame", "ttaug", "norm_ema", "rpl", "rdumb"]

Runner = Callable[[torch.Tensor], torch.Tensor]


def load(model_name: str) -> torch.nn.Module:
    """The model; a timm one with random weights (speed does not depend on them, and
    nothing is downloaded)."""
    return tta.load_model(model_name, **(dict(pretrained=False) if model_name.startswith("timm:") else {}))


def plain(model: torch.nn.Module, options: dict) -> Runner:
    """Eval-mode inference without gradients, with the methods' ``amp``,
    ``channels_last`` and ``compile`` options."""
    model.eval()
    channels_last = bool(options.get("channels_last"))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if options.get("compile"):
        backend = options["compile"]
        model.compile(**({"backend": backend} if isinstance(backend, str) else {}))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.get("amp"))

    @torch.no_grad()
    def run(x):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with autocast:
            return model(x)

    return run


def build(method: str, model_name: str, device: str, options: dict, batch: torch.Tensor,
          model: torch.nn.Module | None = None) -> Runner:
    """``method`` ("plain" for plain inference) on a fresh ``model_name`` (or on
    ``model``, a fresh copy the caller made) on ``device``."""
    model = (load(model_name) if model is None else model).to(device)
    if method == "plain":
        return plain(model, options)
    extra = dict(preset="cifar10") if model_name.startswith("cifar10") else {}
    if method == "eata":
        extra.update(fisher_loader=[batch[:16]], fisher_size=16)
    if "source_loader" in tta.method_defaults(method):
        # One labelled source batch: the step's cost (RMT replays one per step), not
        # the one-off prototypes and warm-up, which RESULTS.md times apart.
        # Every class must have source images (its prototype): as many batches of
        # the same images as it takes to label each class once.
        classes = model.num_classes
        b = batch.shape[0]
        labels = torch.arange(-(-classes // b) * b, device=batch.device) % classes
        extra.update(source_loader=[(batch, chunk) for chunk in labels.split(b)])
        if "num_warmup_images" in tta.method_defaults(method):
            extra.update(num_warmup_images=batch.shape[0])
    return tta.wrap(model, method, **extra, **options)


def cpu_peak_mb(run, x) -> float:
    """Peak of live tensor memory during one call, from the profiler's allocation
    events in time order (what PyTorch allocates, not the process's resident set)."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        run(x)
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def step_peak_mb(run: Runner, x: torch.Tensor) -> float:
    """Memory one call allocates beyond what was live before it (the models of
    the other runners, the data and this method's state are not counted)."""
    if not x.is_cuda:
        return cpu_peak_mb(run, x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(x)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def interleaved_times(runners: dict[str, Runner], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds of each runner's call, ``repeats`` times, the runners interleaved."""
    device = str(x.device)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            sync(device)
            t0 = time.perf_counter()
            run(x)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def measure(model_name: str, methods: list[str], *, batch_size: int, device: str = "cpu",
            options: dict | None = None, repeats: int = 7, deadline: float | None = None) -> dict:
    """Each method on ``model_name`` as a multiple of plain inference (see the
    module doc). Returns ``rows`` (name -> images_per_s, ratio, peak_mb; "plain"
    first), ``errors`` (name -> why it has no row) and ``repeats`` (the number
    run: fewer than asked when the estimate from the warm-up runs says the rest
    would pass ``deadline``, a ``time.perf_counter()`` value; at least 2)."""
    options = dict(options or {})
    torch.manual_seed(0)
    template = load(model_name).to(device)  # copies made on the device are quick
    x = torch.rand(batch_size, 3, *template.input_size, device=device)
    # compilation happens on the first call, and again when the method switches mode
    warmup = 2 if options.get("compile") else 1
    errors: dict[str, str] = {}
    runners: dict[str, Runner] = {}
    for name in ["plain", *methods]:
        if deadline is not None and time.perf_counter() > deadline:
            errors[name] = "not run: time budget spent"
            continue
        try:
            run = build(name, model_name, device, options, x, model=copy.deepcopy(template))
            for _ in range(warmup):  # allocator, oneDNN/cuDNN plans, compilation
                run(x)
            sync(device)
        except Exception as err:  # noqa: BLE001 - a method that cannot run here is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"[:300]
            continue
        runners[name] = run
    if "plain" not in runners:
        return dict(rows={}, errors=errors, repeats=0)
    t0 = time.perf_counter()
    times = interleaved_times(runners, x, 1)
    if deadline is not None:  # the repeats that fit, from the first one
        per_repeat = time.perf_counter() - t0
        repeats = max(2, min(repeats, int((deadline - time.perf_counter()) / max(per_repeat, 1e-9))))
    for name, ts in interleaved_times(runners, x, repeats - 1).items():
        times[name] += ts
    rows = {}
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        rows[name] = dict(images_per_s=batch_size / statistics.median(ts), ratio=ratio,
                          peak_mb=step_peak_mb(runners[name], x))
    return dict(rows=rows, errors=errors, repeats=repeats)


def rate(images_per_s: float) -> str:
    """Images/s as printed: whole numbers, three digits below 100 (a ResNet-50 on
    two CPU cores runs a few images per second)."""
    return f"{images_per_s:.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--amp", default=None, choices=[None, "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", nargs="?", const=True, default=False,
                        help="torch.compile the model (optionally: a backend name)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {k: v for k, v in dict(amp=args.amp, channels_last=args.channels_last,
                                     compile=args.compile).items() if v}
    result = measure(args.model, args.methods, batch_size=args.batch_size, device=args.device,
                     options=options, repeats=args.repeats)

    print("| method | img/s | x plain inference | peak memory MB |")
    print("|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {rate(row['images_per_s'])} | {row['ratio']:.2f} | {row['peak_mb']:.0f} |")
    for name, error in result["errors"].items():
        print(f"| {name} | {error} | | |")
    print(f"\n{args.model}, batch {args.batch_size}, {args.device}, {args.threads} threads, "
          f"amp={args.amp}, channels_last={args.channels_last}, compile={args.compile}, "
          f"torch {torch.__version__}, {cpu_model()}")
    if args.json:
        write_json(args.json, dict(args=vars(args), **result))


if __name__ == "__main__":
    main()
