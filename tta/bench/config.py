"""Where the benchmark's Hydra configs live, and what the runner derives from them.

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
    "method_overrides",
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


def dirname_from_overrides(override_dirname: str) -> str:
    """A safe folder name for Hydra's ``override_dirname``: ``"default"`` when there
    are no overrides, ``/`` replaced (paths in values would nest folders), and long
    names cut with a hash suffix (file systems refuse names over 255 bytes)."""
    name = override_dirname.strip() or "default"
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


def method_overrides(method_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, overrides)`` to pass to :func:`tta.wrap` from a ``method`` config:
    only the values that differ from :func:`tta.method_defaults`, so the Python
    defaults stay the single source of truth (and options that are aliases of each
    other, like norm's ``alpha``/``bn_alpha``, are only passed when set)."""
    import tta

    data = dict(to_container(method_cfg) if isinstance(method_cfg, DictConfig) else method_cfg)
    name = data.pop("name", None)
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
