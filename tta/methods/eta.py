"""``eta``: EATA without the Fisher regulariser (Niu et al., ICML 2022): reliable,
non-redundant, entropy-weighted entropy minimisation, nothing else."""

from __future__ import annotations

from torch import nn

from .eata import EATA
from .registry import register_method


@register_method("eta")
class ETA(EATA):
    """ETA: :class:`EATA` with ``fisher_alpha = 0`` (no Fisher regulariser, so no
    source images needed).

    Presets: ``"imagenet"`` is the defaults; ``"cifar10"`` the CIFAR-10-C setting of
    mariodoebler/test-time-adaptation (cfgs/cifar10_c/eta.yaml): Adam, lr 1e-3,
    ``d_margin = 0.4``."""

    presets = {"cifar10": {"optimizer": "adam", "lr": 1e-3, "d_margin": 0.4}, "imagenet": {}}

    def __init__(self, model: nn.Module, *, fisher_alpha: float = 0.0, **kwargs) -> None:
        super().__init__(model, fisher_alpha=fisher_alpha, **kwargs)
