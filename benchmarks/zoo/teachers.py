"""Distillation teachers: the mean softmax of trained classifiers, on each
augmented batch or computed once per train image (``--teacher-targets fixed``)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

import tta


def teacher_names(teacher: str | list[str] | None) -> list[str]:
    """The model names of a ``teacher`` hyper-parameter: one name, a list of names (an
    ensemble), or none."""
    if teacher is None:
        return []
    return [teacher] if isinstance(teacher, str) else list(teacher)


class MeanSoftmax(nn.Module):
    """The mean softmax of trained classifiers (a distillation target): with several,
    an ensemble whose errors are less correlated than any one member's."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.members = nn.ModuleList(tta.load_model(name).eval() for name in names)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x).softmax(1) for member in self.members]).mean(0)


@torch.no_grad()
def on_image_and_mirror(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 500,
                        desc: str | None = None) -> tuple[Tensor, Tensor]:
    """``fn`` on each uint8 image of ``x`` (as float RGB in [0, 1]) and on its mirror
    image, in batches: the two outputs, concatenated over ``x``."""
    plain, mirror = [], []
    for i in tqdm(range(0, x.shape[0], batch_size), desc=desc, mininterval=5, disable=desc is None):
        xb = x[i:i + batch_size].float().div_(255)
        plain.append(fn(xb))
        mirror.append(fn(xb.flip(3)))
    return torch.cat(plain), torch.cat(mirror)


def fixed_teacher_targets(teacher: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """``teacher``'s probabilities on each uint8 image of ``x`` and on its mirror image,
    averaged: one target per train image for all its augmented views. The 4-px crops
    of the augmentation barely move a CIFAR object; the flip is averaged out, so the
    student is not taught a left-right preference that the flip augmentation denies."""
    plain, mirror = on_image_and_mirror(teacher, x, batch_size, desc="teacher targets")
    return (plain + mirror) / 2
