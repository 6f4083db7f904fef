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

from .config import NON_RESULT_KEYS, compose_config, config_dir, config_hash, register_resolvers
from .report import collect_results, make_report
from .results import load_results
from .runner import run_benchmark
from .settings import BenchConfig, ConfigError, read_config

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
