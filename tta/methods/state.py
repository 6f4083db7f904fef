"""Checks of a state before it is loaded: a method refuses, before anything
changes, a state that is not its own (another method, model or optimizer), since
``nn.Module.load_state_dict`` copies what matches before it reports what does not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import TTAMethod

__all__ = ["check_loadable", "check_optimizer_state", "is_placeholder"]


def check_loadable(method: "TTAMethod", state_dict: Any, strict: bool) -> None:
    """Raise a ``ValueError`` (``TypeError`` for a non-mapping) naming what differs
    unless ``state_dict`` is a state of ``method``'s kind, model and optimizer."""
    name = method.method_name or type(method).__name__
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name}: expected a state dict (a mapping), got {type(state_dict).__name__}")
    own = method.state_dict()
    extra = state_dict.get("_extra_state")
    extra = extra if isinstance(extra, Mapping) else {}
    theirs = extra.get("method")
    if theirs is not None and theirs != method.method_name:
        raise ValueError(f"{name}: this state is from method {theirs!r}; load it into a "
                         f"tta.wrap(model, {theirs!r}). Nothing was loaded")
    saved = extra.get("options")
    if isinstance(saved, Mapping) and method.state_options:
        differ = {k: (saved[k], v) for k, v in method.state_options.items() if k in saved and saved[k] != v}
        if differ:
            said = ", ".join(f"{k}={t!r} (here {m!r})" for k, (t, m) in differ.items())
            fix = ", ".join(f"{k}={t!r}" for k, (t, _) in differ.items())
            raise ValueError(f"{name}: this state was saved with {said}, which its buffers, optimizer and "
                             f"counts follow; load it into tta.wrap(model, {method.method_name!r}, {fix}, ...). "
                             "Nothing was loaded")
    if strict:
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"{name}: the state does not match this method and model (missing keys: "
                f"{_few(missing)}; unexpected keys: {_few(unexpected)}): it is from another "
                "model or method. Nothing was loaded"
            )
    for key, value in state_dict.items():
        mine = own.get(key)
        # the method's own buffers go from placeholders to sized ones once the class
        # count or the image size is known, and back at a reset
        placeholder = key in method._buffers and (is_placeholder(mine) or is_placeholder(value))
        if isinstance(value, Tensor) and isinstance(mine, Tensor) and value.shape != mine.shape and not placeholder:
            raise ValueError(f"{name}: {key!r} has shape {tuple(value.shape)} in the state but "
                             f"{tuple(mine.shape)} here: it is from another model or other options. "
                             "Nothing was loaded")
    if method.optimizer is not None and extra.get("optimizer") is not None:
        check_optimizer_state(method.optimizer, extra["optimizer"], extra.get("optimizer_type"), name)


def is_placeholder(buffer: Any) -> bool:
    """A method buffer not sized yet: a scalar (a NaN running mean) or empty."""
    return isinstance(buffer, Tensor) and (buffer.dim() == 0 or buffer.numel() == 0)


def _few(keys: Sequence[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(map(repr, keys[:n])) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Any, type_name: str | None, method: str
) -> None:
    """The optimizer state must be of this optimizer's kind, over the same parameters."""
    mine = type(optimizer).__name__
    fail = f"{method}: the optimizer state is not this method's {mine} over its adapted parameters"
    if type_name is not None and type_name != mine:
        raise ValueError(f"{fail}: it is a {type_name}'s. Nothing was loaded")
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{fail} (parameter groups differ). Nothing was loaded")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for theirs, own in zip(groups, optimizer.param_groups):
        if len(theirs.get("params", ())) != len(own["params"]):
            raise ValueError(f"{fail}: {len(theirs.get('params', ()))} parameters in the state, "
                             f"{len(own['params'])} here. Nothing was loaded")
        if set(theirs) != set(own):
            raise ValueError(f"{fail}: its settings are {sorted(set(theirs) - {'params'})}, a "
                             f"{mine}'s are {sorted(set(own) - {'params'})}. Nothing was loaded")
    for index, entry in (state.get("state") or {}).items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"{fail}: state for parameter {index!r} of {len(params)}. Nothing was loaded")
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"{fail}: {key} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[index].shape)}. Nothing was loaded")
