"""A small name → factory registry with timm-style listing and helpful errors."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` names what is registered in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name may be taken once."""

        if not isinstance(name, str) or not name:
            bare = f" (decorate with @register_{self.kind.replace(' ', '_')}('name'))" if callable(name) else ""
            raise TypeError(f"a {self.kind} is registered under a non-empty name, got {name!r}{bare}")

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            # else the lookup's close matches failed ("'int' object is not iterable")
            raise TypeError(f"a {self.kind} is looked up by its name, a string, got {type(name).__name__} "
                            f"{_short_repr(name)}")
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(unknown_name_message(self.kind, name, self._entries)) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str such as '*' or 'e*', got {pattern!r}")
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_name_message(kind: str, name: str, known, list_with: str = "list_models()") -> str:
    """'unknown method 'tnet'; did you mean 'tent'? Known: ...' style message; a long
    list of names is left to ``list_with``, the call that lists them."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    listing = ", ".join(known) if len(known) <= 40 else f"{len(known)} names, list them with {list_with}"
    return f"unknown {kind} {name!r}{hint} Known {kind}s: {listing}"
