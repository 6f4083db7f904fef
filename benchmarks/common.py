"""What several benchmark scripts share: the severity-5 CIFAR-10-C stream of the
method tables, its error loops, the Markdown table they print, and the machine line
that goes with every figure."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tta.corruptions import corrupt
from tta.data import cifar10_dir, load_image_folder

#: The 8 corruptions of the method table (the continual stream of RESULTS.md).
EIGHT = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "contrast", "brightness", "pixelate", "jpeg_compression",
]


def method_table_stream(corruptions, num_images, seed):
    """``(name, images, labels)`` per corruption: ``num_images`` shared CIFAR-10 test
    images each (a seeded subset, shuffled), rendered at severity 5 (CIFAR preset)
    with a generator per corruption. ``"clean"`` is the subset as it is.

    This is the stream of RESULTS.md's method, CLIP, guard and zoo tables, defined
    before tta-bench existed: its noise comes from one generator per corruption
    (not per image, as ``tta.bench.render`` seeds it), so it is kept as it is for
    those figures to reproduce. New measurements on a stream go through
    ``tta.bench`` (as ``wild_cifar10c`` and ``same_images_across_scenarios`` do)."""
    x, y = load_image_folder(cifar10_dir("test"), num_images=None, seed=seed)
    g = torch.Generator().manual_seed(seed)
    domains = []
    for i, name in enumerate(corruptions):
        idx = torch.randperm(x.shape[0], generator=g)[:num_images]
        if name == "clean":
            xc = x[idx]
        else:
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            # one generator runs on through chunks of 500: the chunk size is part of
            # the stream's definition (another may draw the noise in another order)
            xc = torch.cat([
                corrupt(x[idx[j:j + 500]], name, 5, preset="cifar", generator=gen)
                for j in range(0, num_images, 500)
            ])
        domains.append((name, xc, y[idx]))
    return domains


@torch.no_grad()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 error (%) of ``model`` in its current mode on images ``x`` (float in [0, 1],
    or uint8), in batches."""
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
        wrong += (model(xb).argmax(1) != y[i:i + batch_size]).sum().item()
    return 100.0 * wrong / x.shape[0]


def stream_errors(model, domains, batch_size, reset_each_shift=False):
    """Error (%) per domain of ``model`` over the stream, in order, and the seconds
    spent inside ``model(x)`` calls; ``reset_each_shift``: ``model.reset()`` before
    every domain but the first (Tent's setting)."""
    errors, elapsed = {}, 0.0
    for i, (domain, x, y) in enumerate(domains):
        if reset_each_shift and i > 0:
            model.reset()
        wrong = 0
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            t0 = time.perf_counter()
            logits = model(xb)
            elapsed += time.perf_counter() - t0
            wrong += (logits.argmax(1) != y[i:i + batch_size]).sum().item()
        errors[domain] = 100.0 * wrong / x.shape[0]
    return errors, elapsed


def print_table(results, cols, total, base, speed_label="x inference"):
    """Markdown table: per-domain error, mean, images/s and time as a multiple of
    ``base`` seconds (plain inference over the same stream)."""
    print(f"| method | {' | '.join(cols)} | mean | img/s | {speed_label} |")
    print("|" + "---|" * (len(cols) + 4))
    for name, r in results.items():
        row = " | ".join(f"{r['errors'][c]:.1f}" for c in cols)
        print(f"| {name} | {row} | **{r['mean']:.1f}** | {total / r['seconds']:.1f} | {r['seconds'] / base:.2f} |")


def parse_lr_overrides(parser: argparse.ArgumentParser, items: list[str], allowed) -> dict[str, float]:
    """``--lr METHOD=LR ...`` as a dict; a method not in ``allowed`` is a usage error."""
    lrs = {k: float(v) for k, v in (item.split("=", 1) for item in items)}
    unknown = set(lrs) - set(allowed)
    if unknown:
        parser.error(f"--lr for unknown methods or methods without a learning rate: {sorted(unknown)}")
    return lrs


def cpu_model() -> str:
    """The CPU's model name (what ``lscpu`` prints), for the record of a figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> str:
    """The line printed under a table: CPU, torch threads, torch version."""
    return f"{cpu_model()}, {threads} threads, torch {torch.__version__}"


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a timing's edge; nothing to wait for on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def write_json(path: str | Path, data: dict) -> None:
    """A script's ``--json`` output."""
    Path(path).write_text(json.dumps(data, indent=1))


def parse_settings(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items: each value a Python literal (number, boolean, list), else a string."""
    import ast

    def value(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    return {k: value(v) for k, v in (item.split("=", 1) for item in items)}
