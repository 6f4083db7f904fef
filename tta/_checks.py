"""Checks of option values shared by methods and augmentations."""

from __future__ import annotations

from typing import Any


def check_positive_int(value: Any, name: str, *, optional: bool = False) -> None:
    """Refuse ``value`` for option ``name`` unless it is an int >= 1 (or None when
    ``optional``). A bool is refused too: ``True`` is an int to Python, and a switch
    given where a count goes would silently run as 1."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")
