"""``tta-bench-report <sweep dir>``: one markdown table and one plot for a sweep.

Reads every ``results.json`` under the folder (the jobs of a ``tta-bench -m`` sweep),
prints a method x domain error table with the mean and images/s, and writes it to
``report.md`` with a comparison plot ``report.png`` beside it.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..paths import atomic_write_bytes
from .checkpoint import CHECKPOINT
from .results import RESULTS_JSON, read_results

log = logging.getLogger("tta.bench.report")

__all__ = ["collect_results", "row_labels", "markdown_table", "plot_comparison", "make_report", "main"]


def collect_results(sweep_dir: str | Path, only: Iterable[frozenset[str]] | None = None,
                    unreadable: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every readable ``results.json`` under ``sweep_dir``, in job order (Hydra's
    job number, then folder name). Each gets ``_path``, its folder. With ``only``,
    just the results whose command-line overrides are one of those sets.

    A ``results.json`` that cannot be read (damaged, not JSON, not a tta-bench
    result) is left out with a warning naming it, and appended to ``unreadable``
    as ``(path, reason)`` when that list is given."""
    wanted = None if only is None else {_result_overrides(o) for o in only}
    root = Path(sweep_dir)
    if root.is_file():  # e.g. a job's results.json: "not found" would send the user looking for it
        raise FileNotFoundError(f"{root} is a file, not a sweep folder: give the folder that holds the jobs' "
                                f"{RESULTS_JSON} (e.g. {root.parent})")
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    found = []
    for path in sorted(root.rglob(RESULTS_JSON)):
        try:
            res = read_results(path)
        except (OSError, ValueError) as err:
            reason = str(err) if isinstance(err, ValueError) else f"cannot be read ({err})"
            log.warning("leaving %s out of the report: %s", path, reason)
            if unreadable is not None:
                unreadable.append((str(path), reason))
            continue
        if wanted is not None and _result_overrides((res.get("hydra") or {}).get("overrides") or []) not in wanted:
            continue
        res["_path"] = str(path.parent)
        found.append(res)
    found.sort(key=lambda r: ((r.get("hydra") or {}).get("job_num") is None,
                              (r.get("hydra") or {}).get("job_num") or 0, r["_path"]))
    return found


def _result_overrides(overrides: Iterable[str]) -> frozenset[str]:
    """Overrides minus those of settings that do not change results (the same
    job whether or not a rerun adds run.progress=false)."""
    from .config import NON_RESULT_KEYS

    return frozenset(_canonical(o) for o in overrides if o.partition("=")[0].lstrip("+~") not in NON_RESULT_KEYS)


def _canonical(override: str) -> str:
    """``key=value`` as Hydra's basic sweeper renders it (``x=true`` -> ``x=True``):
    single runs record overrides as typed, sweep jobs re-rendered."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_override(override)
        if parsed.is_sweep_override():
            return override
        return f"{parsed.get_key_element()}={parsed.get_value_element_as_str()}"
    except Exception:  # not Hydra syntax (hand-written results): compare as written
        return override


def _override_pairs(res: dict[str, Any]) -> dict[str, str]:
    pairs = {}
    overrides = [_canonical(o) for o in (res.get("hydra") or {}).get("overrides") or []]
    kept = _result_overrides(overrides)
    for item in (o for o in overrides if o in kept):
        key, _, value = item.partition("=")
        pairs[key.lstrip("+~")] = value
    return pairs


#: Result fields a report tells apart when the jobs of a sweep differ in them (a
#: scenario may set the batch size).
_RESULT_FIELDS = ("model", "data", "scenario", "batch_size")


def _varying(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], list[str]]:
    """Each result's result-changing overrides, and the settings (override keys and
    result fields) whose values differ between the results, in first-seen order."""
    pairs = [_override_pairs(r) for r in results]
    keys = list(dict.fromkeys(k for p in pairs for k in p if k != "method"))
    # by the values the jobs ran with: run.seed=0 given and left at its default is one seed
    varying = [k for k in keys if len({_setting(r, p, k) for r, p in zip(results, pairs)}) > 1]
    for field in _RESULT_FIELDS:
        if len({r.get(field) for r in results}) > 1 and field not in varying:
            varying.append(field)
    return pairs, varying


def _setting(result: dict[str, Any], pairs: dict[str, str], key: str) -> str | None:
    """The value of ``key`` for one result: its own recorded field for model, data
    and scenario, else the override it ran with, else (a job that left it at its
    default, e.g. in a folder of two sweeps) the value its recorded config holds."""
    if key in _RESULT_FIELDS:
        value = result.get(key)
    elif key in pairs:
        return pairs[key]
    else:
        value = result.get("config")
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, dict):
            return None
        if isinstance(value, list):  # as Hydra writes the overrides of the other rows
            return "[" + ",".join(str(v) for v in value) + "]"
    return None if value is None else str(value)


def row_labels(results: Sequence[dict[str, Any]]) -> list[str]:
    """A label per result: the method, plus each setting that tells results apart
    (e.g. ``tent method.lr=0.01`` or ``tent scenario=mixed_domains``), taken from
    that result itself."""
    pairs, varying = _varying(results)
    labels = []
    for r, p in zip(results, pairs):
        parts = [str(r.get("method"))]
        parts += [f"{k}={v}" for k in varying if (v := _setting(r, p, k)) is not None]
        labels.append(" ".join(parts))
    return labels


def _fmt(v: Any, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "–"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Method x domain error (%) table with the mean error and images/s; every
    setting that differs between the results gets a column, filled from each
    result's own record."""
    pairs, varying = _varying(results)
    domains = list(dict.fromkeys(d for r in results for d in r["error"]))
    header = ["method", *varying, *domains, "mean", "images/s"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * (1 + len(varying)) + ["---:"] * (len(header) - 1 - len(varying))) + "|"]
    for r, p in zip(results, pairs):
        cells = [str(r.get("method"))] + [_setting(r, p, k) or "–" for k in varying]
        cells += [_fmt(r["error"].get(d)) for d in domains]
        cells += [_fmt(r.get("mean_error")), _fmt(r.get("images_per_s"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shared(results: Sequence[dict[str, Any]], field: str) -> str:
    values = list(dict.fromkeys(str(r.get(field)) for r in results))
    return values[0] if len(values) == 1 else f"{len(values)} {field}s (per row)"


def plot_comparison(results: Sequence[dict[str, Any]], fmt: str = "png") -> bytes:
    """An image (PNG, or another matplotlib format ``fmt``): grouped bars of the
    error per domain (and the mean) for each result.

    The legend sits below the axes in as many columns as fit the figure's width,
    and the figure grows with the number of jobs, so labels are never clipped and
    the bars keep the width of the figure whatever the sweep's size."""
    from .results import _pyplot

    plt = _pyplot()
    labels = row_labels(results)
    domains = list(dict.fromkeys(d for r in results for d in r["error"])) + ["mean"]
    n = max(1, len(results))
    width = 0.8 / n
    fig_w = min(20.0, max(7.0, 0.35 * len(domains) * n ** 0.5 + 2.5))
    # Legend entries at fontsize 8 take ~0.065 in a character plus the handle.
    entry_w = 0.065 * max(len(label) for label in labels) + 0.6
    ncol = max(1, min(n, int(fig_w // entry_w)))
    legend_rows = math.ceil(n / ncol)
    fig, ax = plt.subplots(figsize=(fig_w, 4.0 + 0.22 * legend_rows))
    # One colour per job: the default cycle repeats after 10, tab20 after 20.
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    colors = [cmap(i) if n <= 20 else cmap(i / (n - 1)) for i in range(n)]
    for i, (label, r) in enumerate(zip(labels, results)):
        values = [r["error"].get(d, float("nan")) for d in domains[:-1]] + [r.get("mean_error", float("nan"))]
        ax.bar([j + (i - (n - 1) / 2) * width for j in range(len(domains))], values, width, label=label,
               color=colors[i])
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(domains) - 0.4)
    ax.set_ylabel("error (%)")
    ax.set_title(f"{_shared(results, 'data')}, {_shared(results, 'scenario')}, {_shared(results, 'model')}",
                 fontsize=10)
    fig.tight_layout()
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8,
               frameon=False)
    buf = io.BytesIO()
    # "tight" grows the saved canvas to hold the legend below the axes.
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def make_report(sweep_dir: str | Path, out_md: str | Path | None = None,
                out_png: str | Path | None = None, *, plot: bool = True,
                only: Iterable[frozenset[str]] | None = None) -> str:
    """Build the report of the sweep in ``sweep_dir`` (optionally of the jobs in
    ``only``, see :func:`collect_results`); write the markdown (default
    ``<sweep_dir>/report.md``) and the plot (default ``report.png`` beside it);
    return the markdown."""
    unreadable: list[tuple[str, str]] = []
    only = None if only is None else list(only)
    results = collect_results(sweep_dir, only, unreadable)
    # Job folders Hydra made that hold no results yet (a running job, or one killed:
    # rerunning the sweep resumes it); a sweep's own report lists its jobs instead.
    unfinished = [] if only is not None else sorted(
        p.parent for p in Path(sweep_dir).rglob(".hydra") if p.is_dir() and not (p.parent / RESULTS_JSON).exists())
    if not results:
        if unreadable:
            raise FileNotFoundError(
                f"no readable {RESULTS_JSON} under {sweep_dir}; left out: "
                + "; ".join(f"{p} ({r})" for p, r in unreadable)
            )
        raise FileNotFoundError(
            f"no {RESULTS_JSON} under {sweep_dir}: "
            + (f"{len(unfinished)} job folders have none yet (running, or stopped: rerun the sweep to resume)"
               if unfinished else "expected the folder of a tta-bench sweep (e.g. outputs/multirun)")
        )
    sweep = Path(sweep_dir)
    md_path = Path(out_md) if out_md else sweep / "report.md"
    png_path = Path(out_png) if out_png else md_path.with_suffix(".png")
    fmt = png_path.suffix.lower().lstrip(".")
    formats = _plot_formats() if plot else set()
    if plot and fmt not in formats:
        # savefig's format follows the name here: p.svg held PNG bytes before
        raise ValueError(f"--plot {png_path}: matplotlib writes {', '.join(sorted(formats))}; "
                         "end the file name with one of them")
    for path, option in ((md_path, "--out"), (png_path if plot else None, "--plot")):
        # checked before writing: the rename onto a folder failed with a traceback
        # naming a temporary file, after the plot was written beside it
        if path is not None and path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give {option} a file name (e.g. "
                                    f"{path / ('report.md' if option == '--out' else 'report.png')})")
    # every job's, not the first's: a sweep may vary them. A job's domains record
    # the severity they ran at: scenario.severities=[3] names its domains without
    # one ("fog") yet ignores data.severity, which the header must not show.
    severities: set[str] = set()
    for r in results:
        if "/" in next(iter(r["error"]), ""):
            continue  # the domain names carry their severities
        ran = {d.get("severity") for d in r.get("domains") or [] if isinstance(d, dict)} - {None}
        severities |= {str(s) for s in ran} or {str(((r.get("config") or {}).get("data") or {}).get("severity"))}
    # every domain's, not the first's: gradual visits severities 1-4 twice (twice
    # data.num_images images) and 5 once, so its first domain holds twice the last
    per_job = [{str(d.get("num_images")) for d in r["domains"] if isinstance(d, dict)} if r.get("domains")
               else {"?"} for r in results]
    sizes = set().union(*per_job)
    severity = f" (severity {severities.pop()})" if len(severities) == 1 and "None" not in severities else ""
    notes = [
        f"data: {_shared(results, 'data')}" + severity,
        f"model: {_shared(results, 'model')}",
        f"scenario: {_shared(results, 'scenario')}",
        f"batch size: {_shared(results, 'batch_size')}",
        "images per domain: " + (sizes.pop() if len(sizes) == 1 else "per job" if all(len(j) == 1 for j in per_job)
                                 else "per domain (results.csv)"),
        f"device: {_shared(results, 'device')}",
    ]
    text = "\n".join([
        f"# tta-bench report: {sweep}",
        "",
        "Error (%) per domain, mean over domains, and images/s of the adaptation loop.",
        "",
        "; ".join(notes),
        "",
        markdown_table(results),
        "",
    ])
    have = {_result_overrides((r.get("hydra") or {}).get("overrides") or []) for r in results}
    missing = [job for job in only or () if _result_overrides(job) not in have]
    if missing:
        text += f"\nJobs of the sweep without results, failed or not run ({len(missing)}):\n\n" + "".join(
            f"- `{' '.join(sorted(job))}`\n" for job in missing)
    if unfinished:
        text += (f"\nJob folders without results yet, running or stopped ({len(unfinished)}; rerunning the "
                 "sweep resumes them):\n\n" + "".join(
                     f"- `{p}`{' (a checkpoint)' if (p / CHECKPOINT).is_file() else ''}\n" for p in unfinished))
    if unreadable:
        text += f"\nLeft out, unreadable ({len(unreadable)}):\n\n" + "".join(
            f"- `{p}`: {r}\n" for p, r in unreadable)
    if plot:
        atomic_write_bytes(png_path, plot_comparison(results, fmt))
        text += f"\n![comparison]({png_path.name})\n"
    atomic_write_bytes(md_path, text.encode())
    return text


def _plot_formats() -> set[str]:
    """The file formats matplotlib's savefig writes, but its raw pixel buffers."""
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes()) - {"raw", "rgba"}


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``tta-bench-report``."""
    parser = argparse.ArgumentParser(prog="tta-bench-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="folder of a tta-bench sweep (e.g. outputs/multirun)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default <sweep_dir>/report.md)")
    parser.add_argument("--plot", type=Path, default=None, help="plot file (default report.png beside --out)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:  # the warnings about unreadable results go to stderr
        logging.basicConfig(level=logging.WARNING, format="tta-bench-report: %(levelname)s: %(message)s")
    try:
        text = make_report(args.sweep_dir, args.out, args.plot, plot=not args.no_plot)
    except (FileNotFoundError, IsADirectoryError, ValueError) as err:
        print(f"tta-bench-report: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
