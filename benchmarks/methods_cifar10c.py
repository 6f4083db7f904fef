"""Error and speed of every entropy-family method on a severity-5 CIFAR-10-C stream.

The stream: ``--num-images`` shared CIFAR-10 test images per corruption (a seeded
subset, shuffled), rendered with ``tta.corruptions`` (CIFAR preset), streamed
continually (no reset between corruptions) in batches of ``--batch-size``.

    TTA_HOME=../shared python benchmarks/methods_cifar10c.py --num-images 2000

Speed is reported as the ratio of each method's adaptation loop to plain eval-mode
inference of the source model over the same batches, timed in the same process.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import platform
import statistics
import time

import torch

import tta
from tta.data import cifar10_dir, load_image_folder

EIGHT = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "contrast", "brightness", "pixelate", "jpeg_compression",
]

#: The methods of the table; each runs with ``preset="cifar10"``, the CIFAR-10-C settings
#: of the published implementations (``tta.method_presets``).
METHODS = ["source", "norm", "tent", "eta", "eata", "sar", "deyo"]


def build_stream(corruptions, num_images, seed):
    x, y = load_image_folder(cifar10_dir("test"), num_images=None, seed=seed)
    g = torch.Generator().manual_seed(seed)
    domains = []
    for i, name in enumerate(corruptions):
        idx = torch.randperm(x.shape[0], generator=g)[:num_images]
        if name == "clean":
            xc = x[idx]
        else:
            from tta.corruptions import corrupt

            gen = torch.Generator().manual_seed(seed * 1000 + i)
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


def parse_lr_overrides(parser: argparse.ArgumentParser, items: list[str], allowed) -> dict[str, float]:
    """``--lr METHOD=LR ...`` as a dict; a method not in ``allowed`` is a usage error."""
    lrs = {k: float(v) for k, v in (item.split("=", 1) for item in items)}
    unknown = set(lrs) - set(allowed)
    if unknown:
        parser.error(f"--lr for unknown methods or methods without a learning rate: {sorted(unknown)}")
    return lrs


def _value(text: str):
    """``--set`` values: Python literals (numbers, booleans, lists), else strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_method(name, domains, batch_size, model_name, fisher_images, lr=None, preset="cifar10", **overrides):
    model = tta.load_model(model_name)
    kw = dict(overrides, **({} if lr is None else {"lr": lr}))
    if name == "eata":
        kw.update(fisher_loader=[fisher_images[i:i + 100] for i in range(0, len(fisher_images), 100)],
                  fisher_size=len(fisher_images))
    adapted = tta.wrap(model, name, preset=preset, **kw)
    return stream_errors(adapted, domains, batch_size)


def stream_errors(model, domains, batch_size):
    """Error (%) per domain of ``model`` over the stream, in order, and the seconds
    spent inside ``model(x)`` calls."""
    errors, elapsed = {}, 0.0
    for domain, x, y in domains:
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


@torch.no_grad()
def plain_inference_time(domains, batch_size, model_name):
    return stream_errors(tta.load_model(model_name).eval(), domains, batch_size)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--corruptions", nargs="+", default=EIGHT)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--model", default="cifar10_resnet20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="learning-rate overrides, e.g. tent=3e-4 (default: the cifar10 preset); choose them on "
                             "held-out corruptions (speckle_noise gaussian_blur spatter saturate)")
    parser.add_argument("--preset", default="cifar10", help="method preset (tta.method_presets), or none")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="hyper-parameter overrides for every method of the run, e.g. skip_modules=last_stage")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    lrs = parse_lr_overrides(parser, args.lr, [m for m in METHODS if "lr" in tta.method_defaults(m)])

    domains = build_stream(args.corruptions, args.num_images, args.seed)
    fisher_size = tta.method_defaults("eata", preset="cifar10")["fisher_size"]
    fisher_images, _ = load_image_folder(cifar10_dir("train"), num_images=fisher_size, seed=args.seed)
    results, plain = {}, []
    for name in args.methods:
        plain.append(plain_inference_time(domains, args.batch_size, args.model))
        torch.manual_seed(args.seed)
        errors, elapsed = run_method(name, domains, args.batch_size, args.model, fisher_images, lrs.get(name),
                                     preset=None if args.preset == "none" else args.preset, **settings)
        results[name] = dict(errors=errors, mean=statistics.mean(errors.values()), seconds=elapsed)
    plain.append(plain_inference_time(domains, args.batch_size, args.model))
    base = statistics.median(plain)
    total = sum(x.shape[0] for _, x, _ in domains)

    print_table(results, [d for d, _, _ in domains], total, base)
    print(f"\nplain inference: {total / base:.0f} img/s; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            settings = {m: tta.method_presets(m)["cifar10"] for m in args.methods}
            json.dump(dict(args=vars(args), results=results, plain_seconds=plain, settings=settings, lr=lrs),
                      fh, indent=1)


if __name__ == "__main__":
    main()
