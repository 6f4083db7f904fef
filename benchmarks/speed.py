"""Speed of every method as a multiple of plain inference, measured in one process.

For each method: images/s of ``adapted(x)`` (predict + adapt), its ratio to plain
eval-mode ``model(x)`` under ``torch.no_grad()`` on the same batch, and peak memory.
Methods and the plain baseline are interleaved repeat by repeat and the median of
the per-repeat ratios is reported, so machine noise hits both sides alike.

    TTA_HOME=../shared python -m benchmarks.speed                       # ResNet-20, CPU
    python -m benchmarks.speed --model timm:resnet50 --batch-size 64 --device cuda

On a CIFAR-10 model every method runs with ``preset="cifar10"`` (the published CIFAR
settings, ``tta.method_presets``), elsewhere with its defaults.

Peak memory: CUDA ``max_memory_allocated``; on the CPU the peak of live tensor
memory in one call, from the profiler's allocation events (model and data excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta

from benchmarks.common import cpu_model, write_json

METHODS = ["norm", "tent", "eta", "eata", "sar", "deyo", "cotta", "rmt", "roid", "cmf", "santa", "rotta",
           "adacontrast", "lame", "ttaug", "norm_ema", "rpl", "rdumb"]


def load(model_name: str) -> torch.nn.Module:
    """The model; a timm one with random weights (speed does not depend on them, and
    nothing is downloaded)."""
    return tta.load_model(model_name, **(dict(pretrained=False) if model_name.startswith("timm:") else {}))


def build(method: str, model_name: str, device: str, options: dict, batch: torch.Tensor):
    model = load(model_name).to(device)
    if method == "plain":
        model.eval()
        if options.get("channels_last"):
            model.to(memory_format=torch.channels_last)

        @torch.no_grad()
        def plain(x):
            return model(x)

        return plain
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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = {k: v for k, v in dict(amp=args.amp, channels_last=args.channels_last).items() if v}

    size = load(args.model).input_size
    x = torch.rand(args.batch_size, 3, *size, device=args.device)

    runners = {"plain": build("plain", args.model, args.device, dict(channels_last=args.channels_last), x)}
    runners.update({m: build(m, args.model, args.device, options, x) for m in args.methods})
    for run in runners.values():  # warm-up (allocator, oneDNN/cuDNN plans)
        run(x)
    sync(args.device)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            sync(args.device)
            t0 = time.perf_counter()
            run(x)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)

    peak: dict[str, float] = {}
    for name in runners:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            runners[name](x)
            sync(args.device)
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak[name] = cpu_peak_mb(runners[name], x)

    print(f"| method | img/s | x plain inference | peak memory MB |")
    print("|---|---|---|---|")
    rows = {}
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        ips = args.batch_size / statistics.median(ts)
        rows[name] = dict(images_per_s=ips, ratio=ratio, peak_mb=peak[name])
        print(f"| {name} | {ips:.0f} | {ratio:.2f} | {peak[name]:.0f} |")
    print(f"\n{args.model}, batch {args.batch_size}, {args.device}, {args.threads} threads, "
          f"amp={args.amp}, channels_last={args.channels_last}, torch {torch.__version__}, {cpu_model()}")
    if args.json:
        write_json(args.json, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
