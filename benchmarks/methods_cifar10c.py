"""Error and speed of every entropy-family method on a severity-5 CIFAR-10-C stream.

The stream: ``--num-images`` shared CIFAR-10 test images per corruption (a seeded
subset, shuffled), rendered with ``tta.corruptions`` (CIFAR preset), streamed
continually (no reset between corruptions) in batches of ``--batch-size``.

    TTA_HOME=../shared python -m benchmarks.methods_cifar10c --num-images 2000

Speed is reported as the ratio of each method's adaptation loop to plain eval-mode
inference of the source model over the same batches, timed in the same process.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import tta
from tta.bench.source_data import SourceBatches
from tta.data import cifar10_dir, load_image_folder

from benchmarks.common import (EIGHT, method_table_stream, machine, parse_lr_overrides, parse_settings, print_table,
                               stream_errors, write_json)

#: The methods of the table; each runs with ``preset="cifar10"``, the CIFAR-10-C settings
#: of the published implementations (``tta.method_presets``).
METHODS = ["source", "norm", "tent", "eta", "eata", "sar", "deyo"]
#: The continual-shift family (issue 24), selectable with ``--methods`` (as every other
#: image method of ``tta.list_methods()``).
CONTINUAL = ["cotta", "rmt", "roid", "cmf", "santa", "rotta", "adacontrast"]


def share_view_draws_over_the_batch(method) -> None:
    """One draw of every random parameter of the method's view transform per batch,
    as the official code's torchvision transforms on a batch tensor (tta draws per
    image by default): ``same_on_batch`` on each Kornia augmentation of it."""
    transform = getattr(method, "transform", None)
    if not isinstance(transform, torch.nn.Module):
        raise ValueError(f"{method.method_name} has no view transform to share over the batch")
    for module in transform.modules():
        if hasattr(module, "same_on_batch"):
            module.same_on_batch = True


def run_method(name, domains, batch_size, model_name, fisher_images, lr=None, preset="cifar10", seed=0,
               reset_each_shift=False, batch_shared_views=False, **overrides):
    model = tta.load_model(model_name)
    kw = dict(overrides, **({} if lr is None else {"lr": lr}))
    if name == "eata":
        # batched as the test stream, as the port and tta-bench: the Fisher is the squared
        # gradient of a batch's mean loss, so its scale follows the batch size
        kw.update(fisher_loader=[fisher_images[i:i + batch_size] for i in range(0, len(fisher_images), batch_size)],
                  fisher_size=len(fisher_images))
    if "source_loader" in tta.method_defaults(name):
        # Labelled CIFAR-10 train images in shuffled batches of the test batch size,
        # as tta-bench gives them (RMT's prototypes, warm-up and replay; SANTA's prototypes).
        kw.update(source_loader=SourceBatches(cifar10_dir("train"), batch_size, device=torch.device("cpu"),
                                              size=32, seed=seed))
    adapted = tta.wrap(model, name, preset=preset, **kw)
    if batch_shared_views:
        share_view_draws_over_the_batch(adapted)
    return stream_errors(adapted, domains, batch_size, reset_each_shift)


@torch.no_grad()
def plain_inference_time(domains, batch_size, model_name):
    return stream_errors(tta.load_model(model_name).eval(), domains, batch_size)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, help=f"default: {' '.join(METHODS)}; also "
                        f"{' '.join(CONTINUAL)}")
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
    parser.add_argument("--reset-each-shift", action="store_true",
                        help="reset the method to its source state before every corruption (default: continual)")
    parser.add_argument("--batch-shared-views", action="store_true",
                        help="one draw of the view transform's parameters per batch, as the official code's "
                             "torchvision transforms on a batch tensor (default: per image)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.set)
    lrs = parse_lr_overrides(parser, args.lr, [m for m in tta.list_methods() if "lr" in tta.method_defaults(m)])

    domains = method_table_stream(args.corruptions, args.num_images, args.seed)
    fisher_size = tta.method_defaults("eata", preset="cifar10")["fisher_size"]
    fisher_images, _ = load_image_folder(cifar10_dir("train"), num_images=fisher_size, seed=args.seed)
    results, plain = {}, []
    for name in args.methods:
        plain.append(plain_inference_time(domains, args.batch_size, args.model))
        torch.manual_seed(args.seed)
        errors, elapsed = run_method(name, domains, args.batch_size, args.model, fisher_images, lrs.get(name),
                                     preset=None if args.preset == "none" else args.preset, seed=args.seed,
                                     reset_each_shift=args.reset_each_shift,
                                     batch_shared_views=args.batch_shared_views, **settings)
        results[name] = dict(errors=errors, mean=statistics.mean(errors.values()), seconds=elapsed)
    plain.append(plain_inference_time(domains, args.batch_size, args.model))
    base = statistics.median(plain)
    total = sum(x.shape[0] for _, x, _ in domains)

    print_table(results, [d for d, _, _ in domains], total, base)
    print(f"\nplain inference: {total / base:.0f} img/s; {machine(args.threads)}")
    if args.json:
        presets = {m: tta.method_presets(m)["cifar10"] for m in args.methods}
        write_json(args.json, dict(args=vars(args), results=results, plain_seconds=plain, settings=presets, lr=lrs))


if __name__ == "__main__":
    main()
