"""Hydra callbacks of ``tta-bench``: the sweep report printed when a sweep ends."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ReportOnMultirunEnd", "report_sweep", "report_unfinished_sweep", "sweep_job_overrides"]

log = logging.getLogger("tta.bench")


def sweep_job_overrides(task_overrides: Sequence[str]) -> list[frozenset[str]]:
    """The override set of each job of a basic sweep (``a=1,2 b=3`` gives
    ``{a=1, b=3}`` and ``{a=2, b=3}``), spelled the way Hydra's basic sweeper hands
    them to jobs (values re-rendered, a key given twice keeps its last value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    by_key: dict[str, list[str]] = {}
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        key = override.get_key_element()
        if override.is_sweep_override():
            by_key[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
        else:
            by_key[key] = [f"{key}={override.get_value_element_as_str()}"]
    return [frozenset(combo) for combo in itertools.product(*by_key.values())]


#: The sweep this process launched and has not reported yet: when a job fails,
#: Hydra's sweeper raises before ``on_multirun_end``, and tta-bench's ``main``
#: reports the jobs that finished (:func:`report_unfinished_sweep`).
_UNREPORTED: list[tuple[Path, list[str]]] = []


class ReportOnMultirunEnd(Callback):
    """After ``tta-bench -m ...``: print the markdown table of this sweep's jobs
    (also the ones skipped as already done) and write ``report.md``/``report.png``
    to the sweep folder. Other results in the same folder are left out. A sweep
    that a failed job ended is reported too, its jobs without results named."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _UNREPORTED[:] = [(Path(str(config.hydra.sweep.dir)), list(config.hydra.overrides.task))]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _UNREPORTED.clear()
        report_sweep(Path(str(config.hydra.sweep.dir)), list(config.hydra.overrides.task))


def report_unfinished_sweep() -> None:
    """Report the sweep this process launched if a failed job ended it before
    Hydra's ``on_multirun_end`` (nothing when there is none)."""
    if _UNREPORTED:
        sweep_dir, task_overrides = _UNREPORTED.pop()
        report_sweep(sweep_dir, task_overrides)


def report_sweep(sweep_dir: Path, task_overrides: Sequence[str]) -> None:
    """Print the report of the jobs of the sweep run with ``task_overrides`` and
    write it to ``sweep_dir``; a warning instead when none has results."""
    from .report import make_report

    try:
        jobs = sweep_job_overrides(task_overrides)
    except Exception as err:  # a sweeper with its own syntax (e.g. ranges): report all
        log.info("report over every result in %s (%s)", sweep_dir, err)
        jobs = None
    try:
        text = make_report(sweep_dir, only=jobs)
    except FileNotFoundError:
        # The job list did not match what the jobs recorded (another sweeper's
        # spelling): a report of the whole folder beats none.
        try:
            text = make_report(sweep_dir)
        except FileNotFoundError as err:
            log.warning("no report: %s", err)
            return
    print(text, flush=True)
    log.info("report written to %s", sweep_dir / "report.md")
