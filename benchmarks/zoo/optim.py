"""Optimisers and learning-rate schedules of the zoo trainings, and the weight
average of a stochastic-weight-averaging (SWA) run."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from benchmarks.zoo.entries import ZooEntry
from benchmarks.zoo.hparams import swa_start


def make_optimizer(model: nn.Module, entry: ZooEntry, hp: dict) -> torch.optim.Optimizer:
    if not entry.clip:
        # no decay on norm parameters, biases and a ViT's position embedding
        skip = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", set)()}
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
        other = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in skip]
        groups = [dict(params=decay, weight_decay=hp["weight_decay"]), dict(params=other, weight_decay=0.0)]
        if entry.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.999))
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=0.9, nesterov=True)
    trunk = model.clip.visual.trunk
    image = [p for n, p in trunk.named_parameters() if not n.startswith("linear.")]
    image_ids = {id(p) for p in image}
    rest = [p for p in model.clip.parameters() if id(p) not in image_ids]
    groups = [
        dict(params=[p for p in image if p.ndim > 1], lr=hp["image_lr"], weight_decay=hp["weight_decay"]),
        dict(params=[p for p in image if p.ndim <= 1], lr=hp["image_lr"], weight_decay=0.0),
        dict(params=[p for p in rest if p.ndim > 1], lr=hp["lr"], weight_decay=hp["weight_decay"]),
        dict(params=[p for p in rest if p.ndim <= 1], lr=hp["lr"], weight_decay=0.0),
    ]
    return torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.98), eps=1e-6)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, hold_from: int | None = None,
                   hold: float = 0.0):
    """Per-step learning-rate factor: linear warm-up over ``warmup_steps``, then cosine
    decay from 1 to ``hold`` by step ``hold_from`` (default: the last step), then
    ``hold`` to the end: SWA's constant phase, whose weights are averaged. A warm-up
    that reaches past ``hold_from`` ramps up to ``hold``, not to 1."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    end = total_steps if hold_from is None else hold_from

    def base(step: int) -> float:
        if step >= end:
            return hold
        t = (step - warmup_steps) / max(1, end - warmup_steps)
        return hold + (1.0 - hold) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps * base(warmup_steps)
        return base(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule(optimizer: torch.optim.Optimizer, hp: dict, steps_per_epoch: int):
    """The run's schedule: warm-up, cosine to 0, or with SWA cosine to ``swa_lr`` and
    then held there for the averaged epochs."""
    return make_scheduler(optimizer, steps_per_epoch * hp["epochs"], hp["warmup_steps"],
                          hold_from=swa_start(hp) * steps_per_epoch, hold=hp.get("swa_lr", 0.0) / hp["lr"])


def swa_model(average: AveragedModel, batches: Iterable[Tensor]) -> nn.Module:
    """The weight average of an SWA run, ready to evaluate: the mean of the snapshots
    ``average`` collected, with BatchNorm running statistics recomputed on
    ``batches``, since the running statistics of no snapshot belong to the averaged
    weights (Izmailov et al. 2018). A net without BatchNorm (GN, LN) is unaffected."""
    model = average.module
    update_bn(batches, model)
    return model.eval()
