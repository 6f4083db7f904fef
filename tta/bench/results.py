"""Writing a run's results: ``results.json``, ``results.csv``, ``results.png``.

Every file is written through a temporary file and a rename, so a killed run never
leaves a half-written ``results.json`` that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..paths import atomic_write_bytes

if TYPE_CHECKING:
    from datetime import datetime

    import torch

    from .settings import BenchConfig
    from .stream import BatchLoader

__all__ = [
    "RESULTS_JSON",
    "RESULTS_CSV",
    "RESULTS_PNG",
    "versions",
    "git_info",
    "jsonable",
    "write_json",
    "load_results",
    "read_results",
    "write_results",
    "round_figures",
    "plot_run",
    "build_results",
]

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages that shape the results."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("tta", "torch", "torchvision", "timm", "numpy", "hydra-core", "omegaconf", "kornia"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


@lru_cache(maxsize=1)
def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the tta source tree, when tta runs from a git
    checkout (``{"hash": None}`` for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"hash": None, "dirty": None}
    return {"hash": head, "dirty": bool(dirty)}


def code_provenance() -> dict[str, Any]:
    """What made a result besides its config: the tta commit and the packages'
    versions (stored with results and checkpoints, compared on reuse)."""
    return {"versions": versions(), "git": git_info()}


def code_changes(saved: Mapping[str, Any]) -> str:
    """How the code that made ``saved`` (a results dict or a checkpoint, holding
    ``git`` and ``versions``) differs from the code running now: "" when nothing
    recorded differs (the config hash covers the config, not the code)."""
    changes = []
    then, now = saved.get("git"), git_info()
    if isinstance(then, Mapping) and then.get("hash") and now.get("hash") and then["hash"] != now["hash"]:
        changes.append(f"tta commit {str(then['hash'])[:12]} (now {now['hash'][:12]})")
    then = saved.get("versions")
    if isinstance(then, Mapping):
        for dist, version in versions().items():
            if then.get(dist) is not None and version is not None and then[dist] != version:
                changes.append(f"{dist} {then[dist]} (now {version})")
    return ", ".join(changes)


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as None and tuples/numpy scalars as plain JSON types
    (strict JSON, readable by any tool)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Strict JSON, written atomically."""
    text = json.dumps(jsonable(data), indent=1, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` (or the one in folder ``path``) of a finished run.

    Raises ``OSError`` when it cannot be read and ``ValueError`` saying why when
    it is not JSON or not a tta-bench result (a JSON object with an ``error`` dict).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"not valid JSON ({err}; {len(text)} characters)") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a tta-bench result (a JSON {type(data).__name__}, not an object)")
    if not isinstance(data.get("error"), dict):
        raise ValueError("not a tta-bench result (no 'error' dict of per-domain errors)")
    return data


def load_results(path: str | Path) -> dict[str, Any] | None:
    """A ``results.json`` (or the one in folder ``path``); None when missing or
    unreadable (a run killed before writing it). :func:`read_results` says why."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


#: Decimals results.json keeps for each summary figure. Errors are multiples of
#: 100 / N and stay exact to 1e-8 %; timing and memory need no more than they
#: show. Per-step arrays (``steps``) keep full precision.
_DECIMALS = {"error": 8, "mean_error": 8, "ece": 6, "mean_ece": 6, "selected_fraction": 6,
             "images_per_s": 2, "images_per_s_end_to_end": 2, "peak_mem_mb": 1, "seconds": 6}


def round_figures(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` with its summary figures rounded for reading (``32.5``, not
    ``32.49999999999999``): see ``_DECIMALS``; everything else as it is."""

    def rounded(value: Any, digits: int) -> Any:
        if isinstance(value, Mapping):
            return {k: rounded(v, digits) for k, v in value.items()}
        if isinstance(value, float) and math.isfinite(value):
            return round(value, digits)
        return value

    return {k: rounded(v, _DECIMALS[k]) if k in _DECIMALS else v for k, v in results.items()}


#: The summary's keys first, in this order; the bulky parts (config, steps) last.
_ORDER = ["method", "model", "data", "scenario", "error", "mean_error", "ece", "mean_ece",
          "images_per_s", "images_per_s_end_to_end", "peak_mem_mb", "peak_mem_kind"]


def build_results(config: BenchConfig, summary: Mapping[str, Any], speed: Mapping[str, Any],
                  step_s: Sequence[float], *, device: torch.device, loader: BatchLoader,
                  left_out: Sequence[tuple[str, str]], preset: str | None, overrides: Mapping[str, Any],
                  resumed_at: int | None, hydra_info: Mapping[str, Any] | None, started: datetime,
                  seconds: Mapping[str, Any]) -> dict[str, Any]:
    """The results dict of a run (what ``results.json`` holds): the ``summary``
    of :func:`~tta.bench.metrics.summarise`, the ``speed`` of
    :func:`~tta.bench.metrics.throughput`, and what ran, where and when, with the
    figures rounded (:func:`round_figures`)."""
    import torch

    from .metrics import peak_memory_mb

    peak_mb, peak_kind = peak_memory_mb(device)
    results = dict(summary)
    results["steps"] = {**summary["steps"], "seconds": list(step_s)}
    results.update({
        "method": config.method["name"],
        "model": config.model.name,
        "data": config.data.name,
        "scenario": config.scenario.name,
        **speed,
        "resumed_at_batch": resumed_at,
        "seconds": dict(seconds),
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": peak_kind,
        "batch_size": config.run.batch_size,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "num_threads": torch.get_num_threads(),
        "loader": "tensor_cache" if loader.cached else "dataloader",
        "num_bad_files": len(left_out),
        "bad_files": [{"path": p, "reason": r} for p, r in left_out],
        "config": dict(config.plain),
        "config_hash": config.hash,
        "method_preset": preset,
        "method_overrides": dict(overrides),
        **code_provenance(),
        "hydra": dict(hydra_info or {}),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": _now_iso(),
    })
    results = {**{k: results[k] for k in _ORDER if k in results},
               **{k: v for k, v in results.items() if k not in _ORDER and k != "steps"},
               "steps": results["steps"]}
    return round_figures(results)


def _now_iso() -> str:
    """The current UTC time, to the second, in ISO 8601."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_results(output_dir: str | Path, results: Mapping[str, Any], *, plot: bool = True) -> list[Path]:
    """Write ``results.csv`` (one row per domain and a ``mean`` row), the plot, and
    ``results.json`` last: its presence marks the run finished."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    head = ["method", "model", "data", "scenario"]
    keys = [results.get(k) for k in head]
    header = head + ["domain", "corruption", "severity", "num_images", "error", "ece", "selected_fraction"]
    rows = []
    for d in results["domains"]:
        name = d["name"]
        rows.append(keys + [name, d["corruption"], d["severity"], d["num_images"],
                            _round(results["error"][name]), _round((results.get("ece") or {}).get(name)),
                            _round((results.get("selected_fraction") or {}).get(name))])
    rows.append(keys + ["mean", "", "", results["num_images"], _round(results["mean_error"]),
                        _round(results.get("mean_ece")), ""])
    atomic_write_bytes(out / RESULTS_CSV, _csv_bytes(header, rows))
    written.append(out / RESULTS_CSV)
    if plot:
        atomic_write_bytes(out / RESULTS_PNG, plot_run(results))
        written.append(out / RESULTS_PNG)
    write_json(out / RESULTS_JSON, results)
    written.append(out / RESULTS_JSON)
    return written


def _round(v: Any, digits: int = 4) -> Any:
    return round(v, digits) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else v)


def _pyplot():
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless: runs go to clusters and CI without a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(results: Mapping[str, Any]) -> bytes:
    """PNG of a run: error per domain (bars, mean as a line) and the online error
    along the stream (per batch, smoothed, domain changes marked)."""
    plt = _pyplot()
    names = list(results["error"])
    errors = [results["error"][n] for n in names]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(names) + 2), 7))
    ax1.bar(range(len(names)), errors, color="tab:blue")
    ax1.axhline(results["mean_error"], color="tab:red", ls="--", label=f"mean {results['mean_error']:.1f}%")
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel("error (%)")
    ax1.set_title(f"{results['method']} on {results['data']} ({results['scenario']}), {results['model']}")
    ax1.legend(loc="upper right")
    steps = results.get("steps") or {}
    online = steps.get("error") or []
    sizes = steps.get("num_samples") or [1] * len(online)
    if online:
        seen, x = 0, []
        for n in sizes:
            seen += n
            x.append(seen)
        window = max(1, len(online) // 50)
        smooth = [sum(online[max(0, i - window + 1): i + 1]) / len(online[max(0, i - window + 1): i + 1])
                  for i in range(len(online))]
        ax2.plot(x, online, color="0.75", lw=0.6, label="per batch")
        ax2.plot(x, smooth, color="tab:blue", lw=1.4, label=f"moving mean ({window} batches)")
        doms = steps.get("domain") or []
        for i in range(1, len(doms)):
            if doms[i] != doms[i - 1]:
                ax2.axvline(x[i - 1], color="0.5", lw=0.5, ls=":")
        ax2.legend(loc="upper right", fontsize=8)
    ax2.set_xlabel("images seen")
    ax2.set_ylabel("online error (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
