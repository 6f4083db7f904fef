"""Checks of option values shared by methods and augmentations."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, name: str, *, minimum: int = 1, optional: bool = False) -> None:
    """Refuse ``value`` for option ``name`` unless it is an int >= ``minimum`` (or None
    when ``optional``). A bool is refused too: ``True`` is an int to Python, and a
    switch given where a count goes would silently run as 1."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")


def check_positive_int(value: Any, name: str, *, optional: bool = False) -> None:
    """:func:`check_int` with ``minimum=1``: counts of steps, views, images."""
    check_int(value, name, minimum=1, optional=optional)
