"""The benchmark config read once into typed, checked dataclasses.

:func:`read_config` turns a composed ``bench`` config (or the same plain mapping)
into a :class:`BenchConfig`: one frozen dataclass per group (``run``, ``data``,
``scenario``, ``model``), every value checked for type and range when it is read,
so the stages of a run read attributes and never fall back on defaults of their
own. The defaults live in the YAML files alone (``conf/``: ``bench.yaml``,
``data_base.yaml``, ``scenario_base.yaml``, ``model/*.yaml``); a key a config lacks
is an error naming it. ``method`` stays a mapping: :func:`tta.wrap` checks it
against the method's signature.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig

from .config import config_hash, to_container

__all__ = ["ConfigError", "RunConfig", "DataConfig", "ScenarioConfig", "ModelConfig", "BenchConfig",
           "read_config", "KINDS"]

#: The data loaders of ``data.kind``: ImageFolder + tta.corruptions, CIFAR-10-C
#: ``.npy`` files, an ImageNet-C folder tree.
KINDS = ("on_the_fly", "npy", "imagenet_c")


class ConfigError(ValueError):
    """Config values of the wrong type or out of range, or missing; the message
    names each key and what it takes."""


# ----------------------------------------------------------------------------------
# Checks: a value -> None when fine, else what the key takes (for the message)
# ----------------------------------------------------------------------------------

_Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def _range_text(lo: Any, hi: Any, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}" if not lo_open else f" in ({lo}, {hi}]"
    if lo is not None:
        return f" > {lo}" if lo_open else f" >= {lo}"
    return ""


def _nullable(check: _Check, allowed: str, null: bool) -> _Check:
    def checked(v: Any) -> str | None:
        if v is None and null:
            return None
        return None if check(v) else ("null or " if null else "") + allowed

    return checked


def integer(lo: int | None = None, hi: int | None = None, *, null: bool = False, hi_text: str | None = None) -> _Check:
    return _nullable(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
                     "an integer" + _range_text(lo, hi_text or hi), null)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, null: bool = False,
           finite: bool = True) -> _Check:
    def ok(v: Any) -> bool:
        return (_is_number(v) and (not finite or math.isfinite(v))
                and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi))

    return _nullable(ok, ("a finite number" if finite else "a number") + _range_text(lo, hi, lo_open), null)


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(*, null: bool = False) -> _Check:
    return _nullable(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string", null)


def one_of(*options: str, null: bool = False) -> _Check:
    return _nullable(lambda v: v in options, "one of " + ", ".join(options), null)


def list_of(item: _Check, what: str, *, null: bool = False) -> _Check:
    return _nullable(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(item(x) is None for x in v),
                     f"a non-empty list of {what}", null)


def device(v: Any) -> str | None:
    allowed = "auto or a torch device (cpu, cuda, cuda:1, mps, ...)"
    if v == "auto":
        return None
    if not isinstance(v, str):
        return allowed
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return allowed
    return None


def _key(check: _Check) -> Any:
    """A config key: a dataclass field that the config must set, checked by ``check``."""
    return field(metadata={"check": check})


# ----------------------------------------------------------------------------------
# The groups (each key is documented in the YAML that sets its default)
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """``run``: how the job runs (``conf/bench.yaml``)."""

    batch_size: int = _key(integer(1))
    device: str = _key(device)
    # torch.manual_seed and numpy's SeedSequence take non-negative integers.
    seed: int = _key(integer(0, 2**63 - 1, hi_text="2**63-1"))
    num_threads: int | None = _key(integer(1, null=True))
    ece: bool = _key(boolean)
    ece_bins: int = _key(integer(1))
    plot: bool = _key(boolean)
    progress: bool = _key(boolean)
    skip_existing: bool = _key(boolean)
    out_dir: str = _key(text())
    checkpoint_every: int | None = _key(integer(0, null=True))
    checkpoint_minutes: float | None = _key(number(0, null=True))


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the images come from (``conf/data_base.yaml``, ``conf/data/``)."""

    name: str = _key(text())
    kind: str = _key(one_of(*KINDS))
    root: str = _key(text())
    class_index: str = _key(one_of("folder", "imagenet", "auto"))
    corruptions: tuple[str, ...] = _key(list_of(text(), "corruption names"))
    severity: int = _key(integer(1, 5))
    num_images: int | None = _key(integer(1, null=True))
    preset: str | None = _key(one_of("cifar", "tinyimagenet", "imagenet", null=True))
    image_size: int | None = _key(integer(1, null=True))
    crop_ratio: float = _key(number(0, 1, lo_open=True))
    source_root: str | None = _key(text(null=True))
    skip_bad_files: bool = _key(boolean)
    num_workers: int = _key(integer(0))
    # inf: cache any set.
    cache_mb: float = _key(number(0, finite=False))


@dataclass(frozen=True)
class ScenarioConfig:
    """``scenario``: how the domains become a stream (``conf/scenario_base.yaml``)."""

    name: str = _key(text())
    reset_each_shift: bool = _key(boolean)
    mix_domains: bool = _key(boolean)
    severities: tuple[int, ...] | None = _key(list_of(integer(1, 5), "integers in 1..5", null=True))
    label_shift_gamma: float | None = _key(number(0, lo_open=True, null=True))
    label_shift_slots: int | None = _key(integer(1, null=True))


@dataclass(frozen=True)
class ModelConfig:
    """``model``: what :func:`tta.load_model` loads (``conf/model/``)."""

    name: str = _key(text())
    weights: str | None = _key(text(null=True))
    pretrained: bool = _key(boolean)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark job. ``plain`` is the resolved config as composed (what
    ``results.json`` records), ``hash`` its :func:`~tta.bench.config.config_hash`."""

    run: RunConfig
    data: DataConfig
    scenario: ScenarioConfig
    model: ModelConfig
    #: the method's options as the config gives them (name, preset, overrides)
    method: Mapping[str, Any]
    plain: Mapping[str, Any]
    hash: str


_GROUPS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "scenario": ScenarioConfig, "model": ModelConfig}


def _read_group(name: str, cls: type, node: Any, problems: list[str]) -> Any:
    if not isinstance(node, Mapping):
        problems.append(f"{name} must be a group of keys; got {node!r}")
        return None
    known = [f.name for f in fields(cls)]
    values = {}
    for f in fields(cls):
        if f.name not in node:
            problems.append(f"{name}.{f.name} is missing (it has no default outside the YAML files)")
            continue
        value = node[f.name]
        allowed = f.metadata["check"](value)
        if allowed is not None:
            shown = "null" if value is None else repr(value)
            problems.append(f"{name}.{f.name} must be {allowed}; got {shown} ({type(value).__name__})")
        values[f.name] = tuple(value) if isinstance(value, list) else value
    problems += [unknown_key_problem(name, k, known) for k in node if k not in known]
    return cls(**values) if len(values) == len(known) else None


def unknown_key_problem(group: str, key: str, known: Sequence[str]) -> str:
    """How a key that ``group`` does not have is named: with the closest key, if one
    is close, and the group's keys (the config check and tta-bench's check of the
    command line say it alike)."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {group}.{close[0]}? " if close else ""
    return f"{group}.{key} is not a key of {group} ({hint}keys: {', '.join(known)})"


def read_config(cfg: DictConfig | Mapping[str, Any]) -> BenchConfig:
    """The typed config of a composed ``bench`` config, every value checked.

    Raises :class:`ConfigError` listing each bad, missing or unknown key by its
    full dotted name, what it takes and what it got, so ``run.ece_bins=0`` or
    ``data.severity=2.7`` is refused up front instead of silently running
    something else.
    """
    from omegaconf.errors import MissingMandatoryValue

    try:
        plain = to_container(cfg)
    except MissingMandatoryValue as err:  # a ??? in a YAML: OmegaConf's traceback named it
        key = getattr(err, "full_key", None) or "a key"
        raise ConfigError(f"invalid config value: {key} is missing (the YAML that sets it leaves it ???). "
                          f"Set it on the command line ({key}=<value>)") from None
    problems: list[str] = []
    groups = {name: _read_group(name, cls, plain.get(name), problems) for name, cls in _GROUPS.items()}
    method = plain.get("method")
    if not isinstance(method, Mapping) or not method.get("name"):
        problems.append("method.name is missing (pick a method: method=tent)")
    elif "preset" not in method:
        problems.append("method.preset is missing (auto, none or a preset name; conf/method/shared/common.yaml "
                        "sets auto)")
    if len(problems) == 1:
        raise ConfigError(f"invalid config value: {problems[0]}. Set it on the command line "
                          "(<key>=<value>) or in the YAML that sets it")
    if problems:
        raise ConfigError("invalid config values:\n  " + "\n  ".join(problems)
                          + "\nSet them on the command line (<key>=<value>) or in the YAML that sets them")
    return BenchConfig(**groups, method=dict(method), plain=plain, hash=config_hash(plain))
