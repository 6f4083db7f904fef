"""Model names: registered models (``cifar10_resnet20``) and model families, each a
prefix whose loader builds any model of the family (``timm:<model>``).

A family registers itself in its own module, timm-style::

    register_model_family("timm", load_timm)

after which ``load_model("timm:resnet50")`` calls ``load_timm("resnet50", weights=None)``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, NamedTuple

from torch import nn

from .._registry import Registry, unknown_name_message

__all__ = ["ModelFamily", "register_model", "register_model_family", "list_models", "load_model"]


class ModelFamily(NamedTuple):
    """A model family: ``load(rest, weights=..., **kwargs)`` builds the model named
    ``<prefix>:<rest>``; ``list(pattern)``, when the family can list its models, gives
    the ``rest`` of those matching a shell-style pattern."""

    load: Callable[..., nn.Module]
    list: Callable[[str], list[str]] | None = None


_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
_FAMILIES: Registry[ModelFamily] = Registry("model family")


def register_model(name: str) -> Callable:
    """Decorator registering a model factory ``fn(weights=None, **kw) -> nn.Module``."""
    if isinstance(name, str) and ":" in name:
        raise ValueError(f"model name {name!r} has a ':', which separates a family prefix from a model: "
                         f"register a family with register_model_family instead, or drop the ':'")
    return _MODELS.register(name)


def register_model_family(prefix: str, load: Callable[..., nn.Module],
                          list: Callable[[str], list[str]] | None = None) -> None:  # noqa: A002 (timm's word)
    """Make ``load_model("<prefix>:<rest>")`` call ``load(rest, weights=..., **kwargs)``
    and, given ``list``, ``list_models("<prefix>:<pattern>")`` list the family's models."""
    if not prefix or ":" in prefix:
        raise ValueError(f"a model family prefix is a word without ':' (e.g. 'timm'), got {prefix!r}")
    _FAMILIES.register(prefix)(ModelFamily(load, list))


def _prefixes() -> str:
    return ", ".join(f"{p}:" for p in _FAMILIES.names())


def _unknown_prefix(name: str, prefix: str) -> KeyError:
    close = difflib.get_close_matches(prefix, _FAMILIES.names(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0] + name[len(prefix):]!r}?" if close else "."
    return KeyError(f"unknown model family {prefix + ':'!r} in model name {name!r}{hint} Known prefixes: "
                    f"{_prefixes()}; names without a prefix: list_models()")


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern; a pattern starting with a
    family's prefix lists that family's models (``list_models("zoo:*")``,
    ``list_models("timm:convnext*")``, ``list_models("clip:ViT-B-16/*")``)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str such as '*' or 'timm:resnet*', got {pattern!r}")
    prefix, sep, rest = pattern.partition(":")
    if sep and prefix in _FAMILIES:
        family = _FAMILIES.get(prefix)
        if family.list is None:
            raise ValueError(f"model family {prefix + ':'!r} cannot list its models")
        return [f"{prefix}:{n}" for n in family.list(rest or "*")]
    if sep and not any(ch in prefix for ch in "*?["):
        raise _unknown_prefix(pattern, prefix)
    return _MODELS.names(pattern)


def load_model(name: str, *, weights: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` in eval mode.

    Args:
        name: a registered name (``"cifar10_resnet20"``, see :func:`list_models`) or
            ``"<family>:<model>"``: ``"timm:<model>"``, ``"clip:<model>/<pretrained>"``,
            ``"zoo:<name>"``.
        weights: a local checkpoint to load instead of the default weights.
        **kwargs: passed to the factory or the family's loader (``pretrained`` and
            ``num_classes`` for timm; ``classnames``, ``templates``, ``ctx_init`` for
            clip, see :func:`tta.models.clip_models.clip_classifier`; ``verify`` for
            zoo, see :func:`tta.models.zoo.load_zoo_model`).
    """
    if not isinstance(name, str):
        # else "'Sequential' object has no attribute 'partition'"
        fix = " (a model built already needs no loading: pass it to tta.wrap)" if isinstance(name, nn.Module) else ""
        raise TypeError(f"load_model takes a model's name, a string such as 'cifar10_resnet20', got "
                        f"{type(name).__name__}{fix}")
    if isinstance(weights, (str, os.PathLike)):
        # "~/ckpt.pt" as the shell, tta-bench's data.root and TTA_HOME read it
        weights = os.path.expanduser(weights)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FAMILIES:
        model = _FAMILIES.get(prefix).load(rest, weights=weights, **kwargs)
    elif sep:
        raise _unknown_prefix(name, prefix)
    elif name not in _MODELS:
        raise KeyError(f"{unknown_name_message('model', name, _MODELS.names())}; or a model family's "
                       f"'<prefix>:<model>', prefixes {_prefixes()}")
    else:
        model = _MODELS.get(name)(weights=weights, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the loader of model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()
