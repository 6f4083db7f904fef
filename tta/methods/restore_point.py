"""The model as it was before ``tta.wrap`` configured it, put back when the wrap is
refused.

A method configures the model it wraps in place (norm layers' classes and settings,
``requires_grad``, memory format, compilation, a CLIP classifier's learnable prompt)
before all of its options can be checked: some checks need the configured model
(which parameters adapt, the number of classes, the source data's fit). A refused
wrap must leave the caller's model predicting as it did. The restore point keeps
references (each module's attributes, each parameter's tensor), and copies of the
weights' values only for a method that trains the model while it is built (RMT's
warm-up: a read error or Ctrl-C there refuses the wrap after weights changed).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .inputs import set_wrap_mark, wrap_mark

__all__ = ["ModelRestorePoint"]

# containers a module mutates in place (parameters, buffers, submodules, hooks, a
# classifier's caches): their contents are copied, and put back into the same
# objects (hook handles the caller holds refer to them)
_CONTAINERS = (dict, OrderedDict, list, set)


def _snapshot(attrs: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (v, type(v)(v) if type(v) in _CONTAINERS else None) for k, v in attrs.items()}


def _put_back(container: Any, contents: Any) -> None:
    if isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


class ModelRestorePoint:
    """Every module of ``model`` (class and attributes), every parameter (its
    tensor, ``requires_grad`` and gradient), with ``values`` every parameter's and
    buffer's values, and who has wrapped the model, as they are now;
    :meth:`restore` puts them back."""

    def __init__(self, model: nn.Module, values: bool = False) -> None:
        self._model, self._mark = model, wrap_mark(model)
        self._modules = [(m, m.__class__, _snapshot(m.__dict__)) for m in model.modules()]
        self._params = [(p, p.data, p.requires_grad, p.grad) for p in model.parameters()]
        # with ``values``: every parameter's and buffer's values too
        self._values = [(t, t.detach().clone()) for t in model.state_dict(keep_vars=True).values()
                        if isinstance(t, torch.Tensor)] if values else []

    def restore(self) -> None:
        for module, cls, attrs in self._modules:
            module.__class__ = cls
            module.__dict__.clear()
            for key, (value, contents) in attrs.items():
                if contents is not None:
                    _put_back(value, contents)
                module.__dict__[key] = value
        for p, data, requires_grad, grad in self._params:
            p.data = data  # a memory-format change swapped it
            p.requires_grad_(requires_grad)
            p.grad = grad
        with torch.no_grad():
            for tensor, value in self._values:
                tensor.copy_(value)
        set_wrap_mark(self._model, self._mark)
