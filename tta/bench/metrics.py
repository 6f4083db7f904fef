"""What a run measured, summarised: error and calibration per domain, the per-step
table, throughput and peak memory."""

from __future__ import annotations

import resource
import sys
from typing import Any, Sequence

import numpy as np
import torch

from .checkpoint import Progress, record_dicts
from .stream import Stream

__all__ = ["expected_calibration_error", "peak_memory_mb", "summarise", "throughput"]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE in %: the sample-weighted gap between accuracy and mean confidence over
    ``bins`` equal-width confidence bins."""
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"expected_calibration_error needs bins >= 1 (run.ece_bins), got {bins!r}")
    if len(confidence) == 0:
        return float("nan")
    idx = np.clip((confidence * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - confidence[sel].mean())
    return 100.0 * total / len(confidence)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory and how it was measured: CUDA ``max_memory_allocated`` of the
    loop on a GPU, else the process's peak resident set size (whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is kilobytes on Linux, bytes on macOS.
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"


def throughput(stream: Stream, start: int, step_s: Sequence[float], loop_s: float,
               first_done_s: float | None) -> dict[str, float | None]:
    """Images per second of the method calls alone and end to end (loading and
    rendering included), from batch ``start`` on. Both leave out the first step
    when there are others: it pays one-off costs (allocator warm-up, kernel
    selection, optimizer state creation). ``first_done_s``: seconds from the loop's
    start to the end of its first batch."""
    sizes = [e - s for s, e in stream.batches]
    warm = 1 if len(step_s) > 1 else 0
    adapt_s = sum(step_s[warm:])
    seg_warm = 1 if len(stream.batches) - start > 1 else 0
    e2e_s = (loop_s - (first_done_s or 0.0)) if seg_warm else loop_s
    timed_images = sum(sizes[warm:])
    e2e_images = sum(sizes[start + seg_warm:])
    return {"images_per_s": timed_images / adapt_s if adapt_s > 0 else None,
            "images_per_s_end_to_end": e2e_images / e2e_s if e2e_s > 0 else None}


def summarise(stream: Stream, progress: Progress, columns: Sequence[str], *, ece_bins: int | None) -> dict[str, Any]:
    """Error (and, with ``ece_bins``, ECE) per domain in stream order, the fraction
    of images the method selected per domain, and the per-step table: domain,
    error and the record ``columns`` (the fields of the method's record type)."""
    correct = torch.cat(progress.correct).cpu().numpy()
    confidence = torch.cat(progress.confidence).cpu().numpy().astype(np.float64)
    names = [d.name for d in stream.domains]
    ordered = list(dict.fromkeys(names))
    elem_name = np.array(names, dtype=object)[stream.dom]
    error, ece, domains = {}, {}, []
    for n in ordered:
        sel = elem_name == n
        error[n] = float(100.0 * (1.0 - correct[sel].mean()))
        if ece_bins is not None:
            ece[n] = float(expected_calibration_error(confidence[sel], correct[sel], ece_bins))
        first = stream.domains[names.index(n)]
        domains.append({"name": n, "corruption": first.corruption, "severity": first.severity,
                        "num_images": int(sel.sum())})

    steps: dict[str, list] = {"domain": [], "num_samples": [], "num_selected": [], "loss": [], "error": []}
    steps.update({c: [] for c in columns if c not in steps})
    selected = {n: [0, 0] for n in ordered}
    for (s, e), rec in zip(stream.batches, record_dicts(progress.records)):
        doms = set(elem_name[s:e])
        dom = doms.pop() if len(doms) == 1 else "mixed"
        steps["domain"].append(dom)
        steps["error"].append(float(100.0 * (1.0 - correct[s:e].mean())))
        steps["num_samples"].append(rec.get("num_samples", e - s))
        for k in steps:
            if k not in ("domain", "error", "num_samples"):
                steps[k].append(rec.get(k))
        if dom in selected and rec.get("num_selected") is not None:
            selected[dom][0] += rec["num_selected"]
            selected[dom][1] += rec.get("num_samples", e - s)
    result = {
        "error": error,
        "mean_error": float(np.mean(list(error.values()))),
        "num_images": int(len(correct)),
        "num_steps": len(stream.batches),
        "domains": domains,
        "selected_fraction": {n: (a / b if b else None) for n, (a, b) in selected.items()},
        "steps": steps,
    }
    if ece:
        result["ece"] = ece
        result["mean_ece"] = float(np.mean(list(ece.values())))
    return result
