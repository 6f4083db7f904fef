"""Clean test accuracy of zoo classifiers alone and in every ensemble (mean softmax),
with and without averaging each model over the mirror image.

    TTA_HOME=../shared python -m benchmarks.zoo.ensemble zoo:resnet20_bn_jpeg zoo:resnet26_gn zoo:vit_tiny_ln

What a distillation teacher could offer a zoo model (``train --teacher NAME ...
--teacher-targets fixed`` uses exactly the "+ flip" mean softmax of its teachers).
Each model runs once on the 10k test images and once on their mirror images; the
ensembles are then combinations of those probabilities, so adding a model costs one
pass, not one per ensemble. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time

import torch
from torch import Tensor, nn
from tqdm import tqdm

import tta

from benchmarks.common import cpu_model
from benchmarks.zoo.data import decode_split
from benchmarks.zoo.teachers import on_image_and_mirror

DEFAULT_MODELS = ("zoo:resnet20_bn_jpeg", "zoo:resnet26_gn", "zoo:vit_tiny_ln")


def softmax_and_mirror(model: nn.Module, x: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """``model``'s probabilities on each uint8 image of ``x`` and on its mirror image."""
    return on_image_and_mirror(lambda xb: model(xb).softmax(1), x, batch_size)


def ensemble_table(probs: dict[str, tuple[Tensor, Tensor]], y: Tensor) -> list[tuple[tuple[str, ...], float, float]]:
    """Accuracy (%) of every non-empty subset of the models in ``probs`` (name ->
    ``softmax_and_mirror`` output): their mean softmax alone and averaged with the
    mirror-image softmax. Single models first, then pairs, and so on."""
    rows = []
    for size in range(1, len(probs) + 1):
        for names in itertools.combinations(probs, size):
            plain = torch.stack([probs[n][0] for n in names]).mean(0)
            mirror = torch.stack([probs[n][1] for n in names]).mean(0)
            rows.append((names, _accuracy(plain, y), _accuracy((plain + mirror) / 2, y)))
    return rows


def _accuracy(p: Tensor, y: Tensor) -> float:
    return 100.0 * (p.argmax(1) == y).float().mean().item()


def markdown(rows: list[tuple[tuple[str, ...], float, float]]) -> str:
    total = max(len(names) for names, _, _ in rows)
    lines = ["| models | alone | + flip |", "|---|---|---|"]
    for names, alone, flipped in rows:
        label = f"all {total}" if len(names) == total > 2 else " + ".join(f"`{n}`" for n in names)
        lines.append(f"| {label} | {alone:.2f} | {flipped:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), metavar="MODEL",
                        help="tta model names (default: the zoo's three CIFAR-10 classifiers)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if len(set(args.models)) != len(args.models):
        parser.error("a model is named twice")
    torch.set_num_threads(args.threads)

    start = time.time()
    x, y = decode_split("test")
    probs = {}
    for name in tqdm(args.models, desc="models"):
        probs[name] = softmax_and_mirror(tta.load_model(name).eval(), x, args.batch_size)
    print(f"{datetime.date.today()}, {cpu_model()}, {args.threads} thread{'s' if args.threads > 1 else ''}, "
          f"{x.shape[0]} clean test images, batches of {args.batch_size}, {time.time() - start:.0f} s\n")
    print(markdown(ensemble_table(probs, y)))


if __name__ == "__main__":
    main()
