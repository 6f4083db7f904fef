"""``eta``: EATA without the Fisher regulariser (Niu et al., ICML 2022): reliable,
non-redundant, entropy-weighted entropy minimisation, nothing else."""

from __future__ import annotations

from torch import nn

from .eata import EATA
from .registry import register_method


@register_method("eta")
class ETA(EATA):
    """ETA: :class:`EATA` with ``fisher_alpha = 0``."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        kwargs.setdefault("fisher_alpha", 0.0)
        super().__init__(model, **kwargs)
