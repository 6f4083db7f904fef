"""Where the benchmark's Hydra configs live, how they are composed and hashed, and
what the method config becomes (:func:`method_overrides`, :func:`method_preset`);
:mod:`.settings` reads the rest into typed dataclasses.

The YAML files are kept at the repository's ``conf/`` and ship inside the package as
``tta/bench/conf`` (a link to ``../../conf`` in the source tree that setuptools
follows, so wheels hold real files). :func:`config_dir` finds them either way.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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
    "config_changes",
    "method_overrides",
    "method_preset",
    "preset_or",
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
    ``${tta_home:}`` (:func:`tta.paths.tta_home`), ``${tta_dirname:...}`` and
    ``${preset_or:<default>}`` (:func:`preset_or`)."""
    if not OmegaConf.has_resolver("tta_home"):
        OmegaConf.register_new_resolver("tta_home", lambda: str(tta_home()))
    if not OmegaConf.has_resolver("tta_dirname"):
        OmegaConf.register_new_resolver("tta_dirname", dirname_from_overrides)
    if not OmegaConf.has_resolver("preset_or"):
        OmegaConf.register_new_resolver("preset_or", preset_or)


def preset_or(default: Any, *, _node_: Any, _parent_: Any, _root_: Any) -> Any:
    """``${preset_or:<default>}``, the value of a method option that a preset
    changes: the preset's value (``method.preset``, with ``auto`` read from
    ``data.name``), else ``default`` (the Python default). A value set on the command
    line or in a config file replaces the interpolation, so the composed config holds
    what runs: ``method=deyo`` on CIFAR-10-C composes ``optimizer: adam`` (its preset),
    ``method=deyo method.optimizer=sgd`` composes ``sgd``, and their hashes differ."""
    import tta

    data = _root_.get("data") if isinstance(_root_, DictConfig) else None
    try:
        preset = method_preset(_parent_, data.get("name") if isinstance(data, DictConfig) else None)
    except (KeyError, ValueError):  # an unknown method or preset: named where the method is wrapped
        return default
    if preset is None:
        return default
    value = tta.method_presets(_parent_["name"])[preset].get(_node_._key(), default)
    return list(value) if isinstance(value, tuple) else value


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


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """The keys whose values differ between two plain configs, as
    ``"method.lr=0.001 (was 0.00025), data.severity=3 (was 5)"``: what makes a
    checkpoint or a finished run another config's (at most ``limit`` of them;
    :data:`NON_RESULT_KEYS` left out, as from the hash)."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    missing = object()
    keys = [k for k in sorted(flat_old.keys() | flat_new.keys())
            if k not in NON_RESULT_KEYS and not _same(flat_old.get(k, missing), flat_new.get(k, missing))]
    said = [f"{k}={_shown(flat_new, k)} (was {_shown(flat_old, k)})" for k in keys[:limit]]
    if len(keys) > limit:
        said.append(f"and {len(keys) - limit} more")
    return ", ".join(said) or "no key differs (another version of tta)"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(flat: Mapping[str, Any], key: str) -> str:
    return json.dumps(flat[key], default=str) if key in flat else "unset"


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
    defaults override the preset's, and so do those the command line sets (see
    :func:`method_overrides`)."""
    import tta

    preset = method_cfg["preset"]
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


def method_overrides(method_cfg: Mapping[str, Any], preset: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(name, overrides)`` to pass to :func:`tta.wrap` with ``preset`` from a
    ``method`` config: only the values that differ from
    ``tta.method_defaults(name, preset=preset)``, so the Python defaults and presets
    stay the single source of truth (and options that are aliases of each other, like
    norm's ``alpha``/``bn_alpha``, are only passed when set). The options a preset
    changes compose to its values (:func:`preset_or`): a value that differs is one
    set on purpose, even where it is the Python default (``method.optimizer=sgd``
    beats a preset's ``adam``)."""
    import tta

    data = dict(to_container(method_cfg) if isinstance(method_cfg, DictConfig) else method_cfg)
    name = data.pop("name", None)
    data.pop("preset", None)  # see method_preset
    if not name:
        raise ValueError("the method config has no name (expected method.name, e.g. tent)")
    if name not in tta.list_methods():
        from .._registry import unknown_name_message

        raise KeyError(unknown_name_message("method", name, tta.list_methods()))
    defaults = tta.method_defaults(name, preset=preset)
    overrides: dict[str, Any] = {}
    for key, value in data.items():
        if key in defaults and _same(value, defaults[key]):
            continue
        if isinstance(defaults.get(key), tuple) and isinstance(value, list):
            value = tuple(value)
        overrides[key] = value
    return name, overrides
