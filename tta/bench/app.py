"""``tta-bench``: the Hydra application (``python -m tta.bench`` is the same).

Hydra composes ``conf/bench.yaml`` with the command line, picks the output folder
(named after the overrides, so reruns find their results) and launches one job per
combination in multirun mode (``-m``); :func:`run_benchmark` does the work.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import CONFIG_NAME, config_dir, register_resolvers

__all__ = ["main", "task", "USER_ERRORS"]

#: Errors that say what is wrong with the config, the data or the machine, each
#: with its fix: tta-bench prints their message alone (``HYDRA_FULL_ERROR=1`` for
#: the traceback). Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, OSError, RuntimeError)

try:
    from hydra.errors import CompactHydraException as _Compact
except ImportError:  # the bench extra is optional; main() says how to get it
    _Compact = Exception  # type: ignore[assignment,misc]


class JobError(_Compact):  # type: ignore[valid-type,misc]
    """A sweep job refused for a user error: Hydra prints it by its message alone."""


#: What Hydra writes into a job folder before the job runs: a folder holding only
#: these after a failed run is removed, not left behind empty.
_HYDRA_BOOKKEEPING = (".hydra", "tta-bench.log")

#: The Hydra launcher plugins the configs in conf/hydra/launcher extend: the word a
#: launcher's name or config mentions, the plugin's module and its pip package.
_LAUNCHER_PLUGINS = {
    "submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}

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
    out = Path(hc.runtime.output_dir)
    try:
        results = run_benchmark(cfg, out, hydra_info=info)
    except USER_ERRORS as err:
        _discard_if_empty(out, _out_dir(cfg))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"tta-bench: {type(err).__name__}: {_message(err)}"
        if not multirun:
            print(f"{message}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
            sys.exit(1)
        # In a sweep the launcher reports the failed job by its overrides (and the
        # HYDRA_FULL_ERROR hint).
        raise JobError(message) from None
    return float(results["mean_error"])


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _out_dir(cfg: Any) -> Path | None:
    """``run.out_dir`` as an absolute path (None when the config cannot say)."""
    try:
        from omegaconf import OmegaConf

        value = OmegaConf.select(cfg, "run.out_dir")
        return Path(os.path.abspath(value)) if isinstance(value, str) and value.strip() else None
    except Exception:  # a broken config is the error being reported, not this
        return None


def _discard_if_empty(out: Path, out_dir: Path | None = None) -> None:
    """Remove a failed run's folder when it holds nothing but Hydra's bookkeeping
    (a checkpoint or results of an earlier run keep it), then its parents up to
    ``out_dir`` (``run.out_dir``, included) if they are left empty. Never above it:
    empty folders there (e.g. the user's own, holding out_dir) are not the run's."""
    try:
        if not out.is_dir() or any(p.name not in _HYDRA_BOOKKEEPING for p in out.iterdir()):
            return
        shutil.rmtree(out)
        for parent in out.parents:
            if (out_dir is None or not parent.is_relative_to(out_dir) or parent == Path.cwd()
                    or any(parent.iterdir())):
                break
            parent.rmdir()
    except OSError:  # cleaning up must never hide the error being reported
        pass


def _check_launcher(argv: Sequence[str]) -> None:
    """Fail at once, naming the pip package, when ``hydra/launcher=<name>`` asks for
    a launcher whose Hydra plugin is not installed (Hydra would say only "Could
    not load")."""
    import importlib.util

    for arg in argv:
        key, _, name = arg.partition("=")
        if key.lstrip("+") != "hydra/launcher" or not name:
            continue
        path = config_dir() / "hydra" / "launcher" / f"{name}.yaml"
        text = path.read_text() if path.is_file() else ""
        for plugin, (module, package) in _LAUNCHER_PLUGINS.items():
            if (plugin in name or plugin in text) and importlib.util.find_spec(module) is None:
                sys.exit(f"tta-bench: hydra/launcher={name} needs the Hydra plugin {package}: "
                         f"pip install {package}")


def _check_keys(argv: Sequence[str]) -> None:
    """Fail at once, naming the key and the closest one, when an override sets a
    key that run, data, scenario or model do not have (``run.batchsize=8``): Hydra
    would say "Key 'batchsize' is not in struct" and suggest ``+run.batchsize=8``,
    which the config check then refuses."""
    from dataclasses import fields

    from .settings import _GROUPS, unknown_key_problem

    for arg in argv:
        key, eq, _ = arg.partition("=")
        group, dot, leaf = key.partition(".")
        if not eq or not dot or arg.startswith(("-", "+", "~")) or group not in _GROUPS or not leaf.isidentifier():
            continue
        known = [f.name for f in fields(_GROUPS[group])]
        if leaf not in known:
            sys.exit(f"tta-bench: {unknown_key_problem(group, leaf, known)}")


def main() -> None:
    """Console entry point of ``tta-bench``: Hydra parses ``sys.argv``."""
    try:
        import hydra
    except ImportError:  # the bench extra is optional for the library
        sys.exit("tta-bench needs hydra-core: pip install 'tta[bench]'")
    _check_launcher(sys.argv[1:])
    _check_keys(sys.argv[1:])
    try:
        hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(task)()
    except SystemExit as stop:
        if stop.code not in (0, None):
            # A failed job ends a sweep before its report: the finished jobs' still
            # tell something, and the report names the jobs without results.
            from .callbacks import report_unfinished_sweep

            report_unfinished_sweep()
        raise


if __name__ == "__main__":
    main()
