"""Model copies the continual methods keep beside the adapted model, and how they
move: a frozen copy (the source anchor, a teacher before its first update), the
exponential moving average of a mean teacher, the pull of weights back toward the
source (weight ensembling, stochastic restore).

A copy is a submodule of the method, so its weights belong to the method's
``state_dict``: ``reset()`` returns it to the source with everything else and a
checkpoint holds it.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["frozen_copy", "ema_update_", "pull_toward_", "stochastic_restore_"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (configured as it is: test-batch statistics included)
    whose parameters take no gradient."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone


@torch.no_grad()
def ema_update_(teacher: Iterable[Tensor], student: Iterable[Tensor], momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for each pair: the mean teacher's
    update (Tarvainen & Valpola 2017; CoTTA's and RMT's teachers, over parameters)."""
    for t, s in zip(teacher, student):
        t.lerp_(s.to(t.dtype), 1.0 - momentum)


def pull_toward_(params: Sequence[Tensor], anchor: Sequence[Tensor], momentum: float) -> None:
    """``p <- momentum * p + (1 - momentum) * a``: ROID's weight ensembling with the
    source, CMF's ensembling with its hidden model."""
    ema_update_(params, anchor, momentum)


@torch.no_grad()
def stochastic_restore_(params: Sequence[Tensor], source: Sequence[Tensor], prob: float) -> None:
    """Reset each element of ``params`` to its ``source`` value with probability
    ``prob`` (CoTTA's stochastic restore: forgetting is undone a little at every
    step, so errors cannot pile up). Draws from torch's global generator."""
    if prob <= 0:
        return
    for p, p0 in zip(params, source):
        keep = torch.rand(p.shape, device=p.device) >= prob
        p.copy_(torch.where(keep, p, p0.to(p.dtype)))
