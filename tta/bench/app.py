"""``tta-bench``: the Hydra application (``python -m tta.bench`` is the same).

Hydra composes ``conf/bench.yaml`` with the command line, picks the output folder
(named after the overrides, so reruns find their results) and launches one job per
combination in multirun mode (``-m``); :func:`run_benchmark` does the work.
"""

from __future__ import annotations

import sys
from typing import Any

from .config import CONFIG_NAME, config_dir, register_resolvers

__all__ = ["main", "task"]

# At import, not in main(): joblib/submitit workers import this module to unpickle
# the task function, and they resolve hydra.sweep.subdir (${tta_dirname:...}).
register_resolvers()


def task(cfg: Any) -> float:
    """One Hydra job: run the benchmark in Hydra's output folder; return the mean
    error (the value a Hydra sweeper would minimise)."""
    from hydra.core.hydra_config import HydraConfig

    from .runner import run_benchmark

    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    info = {
        "mode": hc.mode.name if hc.mode is not None else None,
        # Only sweeps number their jobs (hydra.job.num is missing in a single run).
        "job_num": hc.job.num if multirun else None,
        "override_dirname": hc.job.override_dirname,
        "overrides": list(hc.overrides.task),
        "sweep_dir": hc.sweep.dir if multirun else None,
    }
    results = run_benchmark(cfg, hc.runtime.output_dir, hydra_info=info)
    return float(results["mean_error"])


def main() -> None:
    """Console entry point of ``tta-bench``: Hydra parses ``sys.argv``."""
    try:
        import hydra
    except ImportError:  # the bench extra is optional for the library
        sys.exit("tta-bench needs hydra-core: pip install 'tta[bench]'")
    hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(task)()


if __name__ == "__main__":
    main()
