"""The method registry: ``@register_method``, ``list_methods``, ``wrap``."""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from .._registry import Registry
from .base import TTAMethod
from .restore_point import ModelRestorePoint

__all__ = ["register_method", "list_methods", "wrap", "method_class", "method_defaults", "method_presets"]

_METHODS: Registry[type[TTAMethod]] = Registry("method")
M = TypeVar("M", bound=type[TTAMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`TTAMethod` subclass under ``name``."""

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, TTAMethod)):
            raise TypeError("@register_method decorates TTAMethod subclasses")
        cls.method_name = name
        return _METHODS.register(name)(cls)

    return decorator


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a shell-style pattern, sorted."""
    return _METHODS.names(pattern)


def method_class(name: str) -> type[TTAMethod]:
    """The class registered under ``name`` (``KeyError`` with close matches if none)."""
    return _METHODS.get(name)


def method_defaults(name: str, preset: str | None = None) -> dict[str, Any]:
    """Every keyword override of method ``name`` with its default value, including
    the shared ones of :class:`TTAMethod` (``steps``, ``optimizer``, ``lr``, ...)
    that the method uses (``source`` and ``norm`` take no optimizer options);
    with ``preset``, the values that preset sets (see :func:`method_presets`)."""
    cls = method_class(name)
    unused = cls.unused_options()
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not issubclass(klass, TTAMethod):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in unused:
                defaults[p.name] = p.default
    if preset is not None:
        defaults.update(preset_overrides(name, preset))
    return defaults


def method_presets(name: str) -> dict[str, dict[str, Any]]:
    """The named presets of method ``name`` (published per-dataset settings, e.g.
    ``"cifar10"``), each a dict of overrides; the class docstring cites the source."""
    return {k: dict(v) for k, v in method_class(name).presets.items()}


def preset_overrides(name: str, preset: str) -> dict[str, Any]:
    """The overrides of ``preset`` for method ``name`` (``KeyError`` naming the
    presets it has)."""
    presets = method_presets(name)
    if preset not in presets:
        have = ", ".join(map(repr, sorted(presets))) or "none"
        raise KeyError(f"method {name!r} has no preset {preset!r}; its presets: {have}")
    return presets[preset]


def wrap(model: nn.Module, name: str, *, preset: str | None = None, **overrides: Any) -> TTAMethod:
    """Wrap ``model`` with adaptation method ``name``; ``overrides`` set its
    hyper-parameters by their paper names, e.g. ``wrap(m, "tent", lr=1e-3)``.
    ``preset`` starts from published settings for a data set (``"cifar10"``,
    ``"imagenet"``; see :func:`method_presets`), which ``overrides`` then refine.

    The returned module predicts and adapts on every ``forward``; ``reset()``
    returns it to the source weights. A refused wrap (a bad option, missing source
    data) leaves ``model`` as it was. Wrapping works inside ``torch.no_grad()`` and
    ``torch.inference_mode()`` blocks too (an evaluation loop's): what the method
    builds (copies, buffers, a Fisher estimate, a warm-up) is built with gradients
    and as normal tensors, which later steps can update.
    """
    if isinstance(model, str) and not isinstance(name, str):
        raise TypeError(f"tta.wrap takes the model first, then the method's name: tta.wrap(model, {model!r})")
    if isinstance(name, type) and issubclass(name, TTAMethod):
        raise TypeError("tta.wrap takes a method's name, not its class: "
                        + (f"tta.wrap(model, {name.method_name!r})" if name.method_name
                           else f"build an unregistered method as {name.__name__}(model, ...)"))
    cls = method_class(name)
    known = method_defaults(name)
    if preset is not None:
        overrides = {**preset_overrides(name, preset), **overrides}
    unknown = [k for k in overrides if k not in known]
    reasons = cls.unused_options()
    unused = [k for k in unknown if k in reasons]
    if unused:
        raise TypeError(
            f"method {name!r} {reasons[unused[0]]}, so {', '.join(map(repr, unused))} would change nothing; "
            f"drop {'them' if len(unused) > 1 else 'it'} (its hyper-parameters are: {', '.join(sorted(known))})"
        )
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=2, cutoff=0.5)
            parts.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise TypeError(
            f"method {name!r} has no hyper-parameter {', '.join(parts)}; "
            f"its hyper-parameters are: {', '.join(sorted(known))}"
        )
    restore_point = ModelRestorePoint(model, values=cls.trains_while_built) if isinstance(model, nn.Module) else None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            method = cls(model, **overrides)
    except BaseException:
        if restore_point is not None:
            restore_point.restore()
        raise
    method.state_options = state_options({**known, **overrides})
    return method


# How a method runs, not what its state means: a state saved under other values loads.
RUNTIME_OPTIONS = ("check_inputs", "amp", "channels_last", "compile")


def state_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a method's state is saved with and checked against at load: all
    but :data:`RUNTIME_OPTIONS`, plain values only (numbers, strings, None, tuples of
    them and dicts of those, as a collapse guard's settings; not loaders,
    transforms or models)."""
    scalar = (bool, int, float, str, type(None))

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value):
            return tuple(value)
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            inner = {k: plain(v) for k, v in value.items()}
            return inner if all(v is not None or value[k] is None for k, v in inner.items()) else None
        return value if isinstance(value, scalar) else None

    kept = {}
    for key, value in options.items():
        if key not in RUNTIME_OPTIONS and (value is None or plain(value) is not None):
            kept[key] = plain(value)
    return kept
