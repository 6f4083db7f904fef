"""``rdumb``: RDumb (Press et al., NeurIPS 2023, "RDumb: A simple approach that
questions our progress in continual test-time adaptation"): ETA, reset to the
source every 1000 updates. On long streams (CCC's millions of images) every method
that keeps adapting eventually collapses; resetting on a fixed schedule beats them.
Any method takes the same rule as ``reset_every=N``.
"""

from __future__ import annotations

from torch import nn

from .eta import ETA
from .registry import register_method


@register_method("rdumb")
class RDumb(ETA):
    """RDumb: :class:`ETA` with ``reset_every = 1000`` (updates, counted per batch
    and step whether or not ETA's filters let a sample through, as the official
    code counts them).

    On the usual CIFAR-10-C stream at batch 200 (15 corruptions x 50 batches = 750
    updates) it never resets and is ETA.

    Presets: ETA's, with the reset: ``"cifar10"`` Adam, lr 1e-3, ``d_margin = 0.4``
    (cfgs/cifar10_c/rdumb.yaml); ``"imagenet"`` SGD (momentum 0.9, Nesterov) lr
    2.5e-4, ``d_margin = 0.05`` (cfgs/imagenet_c/rdumb.yaml)."""

    presets = {"cifar10": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4},
               "imagenet": {"nesterov": True}}

    def __init__(self, model: nn.Module, *, reset_every: int | None = 1000, **kwargs) -> None:
        super().__init__(model, reset_every=reset_every, **kwargs)
