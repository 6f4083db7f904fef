"""Streaming benchmark of test-time adaptation methods, configured through Hydra.

Command line (``tta-bench`` or ``python -m tta.bench``)::

    tta-bench method=tent data.corruptions=[gaussian_noise,contrast] data.num_images=1000
    tta-bench -m method=source,norm,tent,deyo     # one job per method, resumable
    tta-bench-report outputs/multirun             # markdown table + comparison plot

From Python::

    from tta.bench import compose_config, run_benchmark
    cfg = compose_config(["method=tent", "data.num_images=256"])
    results = run_benchmark(cfg, "outputs/tent")   # also writes results.json/.csv/.png

Configs live in ``conf/`` (shipped as ``tta/bench/conf``): ``model/``, ``method/``,
``data/``, ``scenario/`` and ``hydra/launcher/`` groups, every key commented.
:func:`read_config` reads a composed config into the typed :class:`BenchConfig` the
runner's stages take (``runner.py`` lists the stages, ``ARCHITECTURE.md`` draws them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import NON_RESULT_KEYS, compose_config, config_dir, config_hash, register_resolvers
    from .report import collect_results, make_report
    from .results import load_results
    from .runner import run_benchmark
    from .settings import BenchConfig, ConfigError, read_config

# Loaded on first use (PEP 562): importing the submodules here put tta.bench.report in
# sys.modules before ``python -m tta.bench.report`` ran it, which runpy warns about.
_SOURCES = {
    "NON_RESULT_KEYS": "config", "compose_config": "config", "config_dir": "config", "config_hash": "config",
    "register_resolvers": "config", "collect_results": "report", "make_report": "report",
    "load_results": "results", "run_benchmark": "runner", "BenchConfig": "settings", "ConfigError": "settings",
    "read_config": "settings",
}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))

__all__ = [
    "BenchConfig",
    "ConfigError",
    "NON_RESULT_KEYS",
    "collect_results",
    "compose_config",
    "config_dir",
    "config_hash",
    "load_results",
    "make_report",
    "read_config",
    "register_resolvers",
    "run_benchmark",
]
