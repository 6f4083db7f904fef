"""Zero-shot CLIP, TPT, RLCF, VTE and TTRV on the zoo's CLIP pair under severity-5 CIFAR-10-C.

The policy is ``zoo:clip_small`` (CIFAR ResNet-20 image tower), the RLCF reward
model ``zoo:clip_base`` (ResNet-56, AugMix-trained), both from
``benchmarks/zoo/train.py``. The stream is that of ``methods_cifar10c.py``
(``benchmarks.common.method_table_stream``):
``--num-images`` test images per corruption, rendered with ``tta.corruptions``
(CIFAR preset). TPT, RLCF, VTE and TTRV's episodic mode start every image from the
source model; TTRV's online and single-example modes carry what they learned along the
stream (continual, in the corruptions' order).

    TTA_HOME=../shared python -m benchmarks.clip_cifar10c --num-images 500

``--lr`` overrides a method's learning rate; choose it on held-out corruptions (the
extra four: ``--corruptions speckle_noise gaussian_blur spatter saturate``), not on
the 8 reported ones.

Each method's adaptation time is reported as a multiple of zero-shot inference of
the policy over the same batches, timed in the same process.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import tta
from tta.models.clip import TEMPLATE_SETS

from benchmarks.common import (EIGHT, method_table_stream, machine, parse_lr_overrides, parse_settings, print_table,
                               stream_errors, write_json)

POLICY, REWARD = "zoo:clip_small", "zoo:clip_base"

# method label -> (registered method, settings); None: no adaptation
METHODS: dict[str, tuple[str, dict] | None] = {
    "zero-shot": None,
    "tpt": ("tpt", {}),
    "rlcf-prompt": ("rlcf", dict(reward=REWARD, adapt="prompt")),
    "rlcf-tune": ("rlcf", dict(reward=REWARD, adapt="image")),
    "rlcf-tune-ema": ("rlcf", dict(reward=REWARD, adapt="image", ema=True)),
    "vte": ("vte", {}),
    "ttrv-online": ("ttrv", {}),
    "ttrv-online-image": ("ttrv", dict(adapt="image")),
    "ttrv-online-image-norm": ("ttrv", dict(adapt="image_norm")),
    "ttrv-online-steps": ("ttrv", dict(steps=4)),
    "ttrv-episodic": ("ttrv", dict(mode="episodic")),
    "ttrv-views": ("ttrv", dict(sampling="views")),
    "ttrv-views-episodic": ("ttrv", dict(sampling="views", mode="episodic")),
    "ttrv-single": ("ttrv", dict(mode="single_example")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--corruptions", nargs="+", default=EIGHT)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", default="photo", choices=TEMPLATE_SETS,
                        help="the policy's text templates (VTE's official CIFAR-10 runs: cifar10, the CLIP "
                             "authors' 18)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="learning rate overrides, e.g. rlcf-prompt=0.05 (default: the papers')")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="an option for every adapting method, e.g. temperature=0.5")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lrs = parse_lr_overrides(parser, args.lr, [m for m in METHODS if METHODS[m] is not None])
    domains = method_table_stream(args.corruptions, args.num_images, args.seed)
    total = sum(x.shape[0] for _, x, _ in domains)
    results, plain = {}, []
    with torch.no_grad():
        reward_errors, _ = stream_errors(tta.load_model(REWARD), domains, args.batch_size)
    for label in args.methods:
        with torch.no_grad():
            plain.append(stream_errors(tta.load_model(POLICY, templates=args.templates), domains,
                                       args.batch_size)[1])
        torch.manual_seed(args.seed)
        model = tta.load_model(POLICY, templates=args.templates)
        if METHODS[label] is None:
            with torch.no_grad():
                errors, elapsed = stream_errors(model, domains, args.batch_size)
        else:
            name, settings = METHODS[label]
            settings = dict(settings, **parse_settings(args.set))
            if label in lrs:
                settings = dict(settings, lr=lrs[label])
            errors, elapsed = stream_errors(tta.wrap(model, name, **settings), domains, args.batch_size)
        results[label] = dict(errors=errors, mean=statistics.mean(errors.values()), seconds=elapsed)
        print(f"{label}: mean error {results[label]['mean']:.2f} ({elapsed:.0f} s)", flush=True)
    base = statistics.median(plain)

    cols = [d for d, _, _ in domains]
    print()
    print_table(results, cols, total, base, "x zero-shot")
    row = " | ".join(f"{reward_errors[c]:.1f}" for c in cols)
    print(f"| (reward model, zero-shot) | {row} | {statistics.mean(reward_errors.values()):.1f} | | |")
    print(f"\nzero-shot inference: {total / base:.0f} img/s; {machine(args.threads)}; "
          f"{args.num_images} images per corruption; policy templates {args.templates!r}")
    if args.json:
        write_json(args.json, dict(args=vars(args), results=results, reward_errors=reward_errors,
                                   zero_shot_seconds=plain))


if __name__ == "__main__":
    main()
