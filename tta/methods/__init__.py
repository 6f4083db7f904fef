"""Adaptation methods, one per module, registered by name."""

from . import (  # noqa: F401  (registration)
    adacontrast, cmf, cotta, deyo, eata, eta, foa, lame, memo, norm, norm_ema, rdumb, rlcf, rmt, roid, rotta, rpl,
    santa, sar, source, tent, tpt, ttaug, ttrv, vte,
)
from .base import TTAMethod
from .records import StepRecord
from .entropy import softmax_entropy
from .params import last_stage_prefixes, select_norm_params
from .registry import list_methods, method_class, method_defaults, method_presets, register_method, wrap

__all__ = [
    "StepRecord",
    "TTAMethod",
    "list_methods",
    "method_class",
    "method_defaults",
    "method_presets",
    "register_method",
    "wrap",
    "softmax_entropy",
    "select_norm_params",
    "last_stage_prefixes",
]
