"""Where the benchmark's Hydra configs live, and what the runner derives from them.

The YAML files are kept at the repository's ``conf/`` and ship inside the package as
``tta/bench/conf`` (a link to ``../../conf`` in the source tree that setuptools
follows, so wheels hold real files). :func:`config_dir` finds them either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from ..paths import tta_home

__all__ = [
    "NON_RESULT_KEYS",
    "CONFIG_NAME",
    "config_dir",
    "register_resolvers",
    "compose_config",
    "to_container",
    "config_hash",
    "ConfigError",
    "validate_config",
    "method_overrides",
    "method_preset",
    "DATA_PRESETS",
    "dirname_from_overrides",
]

CONFIG_NAME = "bench"

#: Dotted keys that change neither the stream nor the results: left out of the
#: config hash and of the output folder name (``hydra.job.config.override_dirname
#: .exclude_keys`` in ``conf/bench.yaml`` lists the same keys).
NON_RESULT_KEYS: tuple[str, ...] = (
    "run.progress",
    "run.skip_existing",
    "run.out_dir",
    "run.plot",
    "run.checkpoint_every",
    "run.checkpoint_minutes",
    "data.num_workers",
    "data.cache_mb",
    # Never changes the numbers of a run on readable files (with bad files, false
    # refuses to run); the runner does not reuse results that left files out for
    # a run with it false.
    "data.skip_bad_files",
)

_MAX_DIRNAME = 200


def config_dir() -> Path:
    """Absolute path of the benchmark's config folder (holding ``bench.yaml``)."""
    here = Path(__file__).resolve().parent / "conf"
    if (here / f"{CONFIG_NAME}.yaml").is_file():
        return here
    raise FileNotFoundError(
        f"tta.bench configs not found at {here}: the package was installed without its "
        "package data (reinstall tta; in a source checkout tta/bench/conf links to conf/)"
    )


#: Override values longer than this are shortened in folder names.
_MAX_VALUE = 24


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes (Hydra joins the
    overrides of ``override_dirname`` with commas, and list values hold commas)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _short_value(value: str) -> str:
    """A long override value as a readable stand-in plus a hash of the exact value
    (``[gaussian_noise,...]`` of 8 names -> ``8items-1a2b3c4d``; a long path ->
    its last component and the hash): stable, so a rerun finds its folder."""
    if len(value) <= _MAX_VALUE:
        return value
    digest = hashlib.sha1(value.encode()).hexdigest()[:8]
    if value.startswith("[") and value.endswith("]"):
        items = [v for v in _split_top_level(value[1:-1]) if v.strip()]
        return f"{len(items)}items-{digest}"
    # a path by its last component, anything else by its start
    parts = [p for p in re.split(r"[/\\]", value) if p]
    stem = parts[-1][:16] if len(parts) > 1 else value[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._-")
    return f"{stem}-{digest}" if stem else digest


def dirname_from_overrides(override_dirname: str) -> str:
    """A short, safe folder name for Hydra's ``override_dirname``: ``"default"``
    when there are no overrides, long values shortened with a hash
    (:func:`_short_value`), ``/`` replaced (paths in values would nest folders),
    and a name still too long cut with a hash suffix (file systems refuse names
    over 255 bytes)."""
    name = override_dirname.strip()
    if name:
        items = []
        for item in _split_top_level(name):
            key, eq, value = item.partition("=")
            items.append(f"{key}={_short_value(value)}" if eq else item)
        name = ",".join(items)
    name = name or "default"
    name = name.replace("/", "_").replace("\\", "_")
    name = re.sub(r"[\x00-\x1f]", "_", name)
    if name in (".", ".."):
        name = name.replace(".", "_")
    if len(name.encode()) > _MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: _MAX_DIRNAME - 11].decode(errors="ignore") + "-" + digest
    return name


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (idempotent):
    ``${tta_home:}`` (:func:`tta.paths.tta_home`) and ``${tta_dirname:...}``."""
    if not OmegaConf.has_resolver("tta_home"):
        OmegaConf.register_new_resolver("tta_home", lambda: str(tta_home()))
    if not OmegaConf.has_resolver("tta_dirname"):
        OmegaConf.register_new_resolver("tta_dirname", dirname_from_overrides)


def compose_config(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> DictConfig:
    """The benchmark config with command-line style ``overrides`` applied, through
    Hydra's compose API (what ``tta-bench <overrides>`` would run, without Hydra's
    output folders)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)


def to_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Plain, resolved dict of ``cfg`` without Hydra's own node."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    else:
        data = json.loads(json.dumps(cfg))
    data.pop("hydra", None)
    return data


def _drop_keys(data: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """sha256 of the resolved config, without :data:`NON_RESULT_KEYS`: equal hashes
    mean the same stream, model and method, so a finished run can be reused."""
    data = _drop_keys(to_container(cfg), NON_RESULT_KEYS)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


#: The method preset (``tta.method_presets``) of each data config: what
#: ``method.preset=auto`` means. Other data sets use the methods' defaults.
DATA_PRESETS: dict[str, str] = {"cifar10c": "cifar10", "cifar10c_disk": "cifar10", "imagenetc": "imagenet"}


def method_preset(method_cfg: Mapping[str, Any], data_name: str | None) -> str | None:
    """The preset to wrap the method with: ``method.preset`` (a preset name,
    ``none`` for the methods' defaults, ``auto`` for the preset of the data set,
    :data:`DATA_PRESETS`). Values of the method config that differ from the
    defaults override the preset's."""
    import tta

    preset = method_cfg.get("preset", "auto")
    if preset in (None, "none"):
        return None
    have = tta.method_presets(method_cfg["name"])
    if preset == "auto":
        preset = DATA_PRESETS.get(str(data_name))
        return preset if preset in have else None
    if preset not in have:
        raise ValueError(f"method.preset={preset!r}: method {method_cfg['name']!r} has the presets "
                         f"{', '.join(sorted(have))} (or auto, none)")
    return preset


def method_overrides(method_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, overrides)`` to pass to :func:`tta.wrap` from a ``method`` config:
    only the values that differ from :func:`tta.method_defaults`, so the Python
    defaults stay the single source of truth (and options that are aliases of each
    other, like norm's ``alpha``/``bn_alpha``, are only passed when set)."""
    import tta

    data = dict(to_container(method_cfg) if isinstance(method_cfg, DictConfig) else method_cfg)
    name = data.pop("name", None)
    data.pop("preset", None)  # see method_preset
    if not name:
        raise ValueError("the method config has no name (expected method.name, e.g. tent)")
    if name not in tta.list_methods():
        from .._registry import unknown_name_message

        raise KeyError(unknown_name_message("method", name, tta.list_methods()))
    defaults = tta.method_defaults(name)
    overrides: dict[str, Any] = {}
    for key, value in data.items():
        if key in defaults and _same(value, defaults[key]):
            continue
        if isinstance(defaults.get(key), tuple) and isinstance(value, list):
            value = tuple(value)
        overrides[key] = value
    return name, overrides


# ----------------------------------------------------------------------------------
# Checking the values of a config, once, when a run reads it
# ----------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Config values of the wrong type or out of range; the message names each key
    and what it takes."""


#: A check: the value -> None when fine, else what the key takes (for the message).
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


def _integer(lo: int | None = None, hi: int | None = None, *, null: bool = False, hi_text: str | None = None) -> _Check:
    allowed = ("null or " if null else "") + "an integer" + _range_text(lo, hi_text or hi)

    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else allowed

    return check


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, null: bool = False,
            finite: bool = True) -> _Check:
    allowed = ("null or " if null else "") + ("a finite number" if finite else "a number") + _range_text(lo, hi, lo_open)

    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        ok = (_is_number(v) and (not finite or math.isfinite(v))
              and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi))
        return None if ok else allowed

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _text(*, null: bool = False) -> _Check:
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        return None if isinstance(v, str) and v.strip() else ("null or " if null else "") + "a non-empty string"

    return check


def _one_of(*options: str, null: bool = False) -> _Check:
    allowed = ("null or " if null else "") + "one of " + ", ".join(options)

    def check(v: Any) -> str | None:
        return None if (v is None and null) or v in options else allowed

    return check


def _list_of(item: _Check, what: str, *, null: bool = False) -> _Check:
    allowed = ("null or " if null else "") + f"a non-empty list of {what}"

    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(item(x) is None for x in v)
        return None if ok else allowed

    return check


def _device(v: Any) -> str | None:
    allowed = "auto or a torch device (cpu, cuda, cuda:1, mps, ...)"
    if v in (None, "auto"):
        return None
    if not isinstance(v, str):
        return allowed
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return allowed
    return None


#: The checked keys. Keys a config lacks are not checked (the runner has defaults
#: for them); method.* is checked by the method itself (tta.wrap) and model.name
#: by tta.load_model.
_CHECKS: dict[str, _Check] = {
    "run.batch_size": _integer(1),
    "run.device": _device,
    # torch.manual_seed and numpy's SeedSequence take non-negative integers.
    "run.seed": _integer(0, 2**63 - 1, hi_text="2**63-1"),
    "run.num_threads": _integer(1, null=True),
    "run.ece": _boolean,
    "run.ece_bins": _integer(1),
    "run.plot": _boolean,
    "run.progress": _boolean,
    "run.skip_existing": _boolean,
    "run.out_dir": _text(),
    "run.checkpoint_every": _integer(0, null=True),
    "run.checkpoint_minutes": _number(0, null=True),
    "data.name": _text(),
    "data.kind": _one_of("on_the_fly", "npy", "imagenet_c"),
    "data.root": _text(),
    "data.class_index": _one_of("folder", "imagenet", "auto"),
    "data.corruptions": _list_of(_text(), "corruption names"),
    "data.severity": _integer(1, 5),
    "data.num_images": _integer(1, null=True),
    "data.preset": _one_of("cifar", "tinyimagenet", "imagenet", null=True),
    "data.image_size": _integer(1, null=True),
    "data.crop_ratio": _number(0, 1, lo_open=True),
    "data.source_root": _text(null=True),
    "data.num_workers": _integer(0),
    # inf: cache any set (a float, like 4096.5, is fine too).
    "data.cache_mb": _number(0, finite=False),
    "data.skip_bad_files": _boolean,
    "scenario.name": _text(),
    "scenario.reset_each_shift": _boolean,
    "scenario.mix_domains": _boolean,
    "scenario.severities": _list_of(_integer(1, 5), "integers in 1..5", null=True),
    "scenario.label_shift_gamma": _number(0, lo_open=True, null=True),
    "scenario.label_shift_slots": _integer(1, null=True),
    "model.weights": _text(null=True),
    "model.pretrained": _boolean,
}


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Check the type and range of every value of a ``bench`` config that the runner
    reads (see ``_CHECKS``); return the resolved plain dict.

    Raises :class:`ConfigError` listing each bad key by its full dotted name, what
    it takes and what it got, so ``run.ece_bins=0`` or ``data.severity=2.7`` is
    refused up front instead of silently running something else.
    """
    data = to_container(cfg)
    problems = []
    for dotted, check in _CHECKS.items():
        section, _, leaf = dotted.partition(".")
        node = data.get(section)
        if not isinstance(node, Mapping) or leaf not in node:
            continue
        value = node[leaf]
        allowed = check(value)
        if allowed is not None:
            shown = "null" if value is None else repr(value)
            problems.append(f"{dotted} must be {allowed}; got {shown} ({type(value).__name__})")
    if len(problems) == 1:
        raise ConfigError(f"invalid config value: {problems[0]}. Set it on the command line "
                          "(<key>=<value>) or in the YAML that sets it")
    if problems:
        raise ConfigError("invalid config values:\n  " + "\n  ".join(problems)
                          + "\nSet them on the command line (<key>=<value>) or in the YAML that sets them")
    return data
