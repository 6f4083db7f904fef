"""Warnings that name the user's line."""

from __future__ import annotations

import os
import sys
import warnings

import torch

# tta's own files and torch's (nn.Module.__call__ sits between a user and forward)
_INTERNAL_DIRS = tuple(os.path.join(d, "") for d in (os.path.dirname(__file__), os.path.dirname(torch.__file__)))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside tta and torch, so the
    warning names the user's line however deep in tta (subclass ``__init__``s,
    ``tta.wrap``, ``nn.Module.__call__``) it was raised."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: our caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
