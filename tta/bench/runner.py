"""The streaming benchmark loop: model, method, stream, metrics, results."""

from __future__ import annotations

import io
import logging
import resource
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from .config import config_hash, method_overrides, method_preset, register_resolvers, validate_config
from ..methods.base import StepRecord
from ..paths import atomic_write_bytes
from .results import RESULTS_JSON, git_info, load_results, round_figures, versions, write_results
from .sources import Domain, build_domains, load_source_images
from .stream import BatchLoader, Batch, Stream, build_stream, seed_for

__all__ = ["run_benchmark", "resolve_device", "expected_calibration_error", "peak_memory_mb"]

log = logging.getLogger("tta.bench")

#: Batch size of the clean source images that estimate EATA's Fisher information
#: (the paper's test batch size; independent of run.batch_size so batch-size-1 runs
#: do not estimate it from single images).
FISHER_BATCH_SIZE = 64


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; cuda without a GPU is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but torch sees no CUDA device; use run.device=cpu")
    return device


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_model_size(x: Tensor, size: Sequence[int] | None) -> Tensor:
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


class _Renderer:
    """Corrupts on-the-fly batches on the run device. Every image gets its own
    generator, seeded from (run seed, corruption, severity, image id): the same
    image shows the same corruption in every scenario, stream order and batch,
    whatever the method."""

    def __init__(self, stream: Stream, device: torch.device, seed: int, preset: str | None) -> None:
        from .. import corruptions

        self.corrupt = corruptions.corrupt
        self.stream, self.device, self.seed, self.preset = stream, device, seed, preset

    def generators(self, domain: Domain, positions: np.ndarray) -> list[torch.Generator]:
        key = zlib.crc32(domain.corruption.encode())
        assert domain.image_ids is not None, "a rendered domain names its images"
        return [torch.Generator(device=self.device).manual_seed(
                    seed_for(self.seed, 3, key, domain.severity, int(i)))
                for i in domain.image_ids[positions]]

    def __call__(self, x: Tensor, batch: Batch) -> Tensor:
        s, e = self.stream.batches[batch.index]
        positions = self.stream.pos[s:e]
        groups = np.unique(batch.domains)
        out = x
        for d in groups:
            domain = self.stream.domains[int(d)]
            if not domain.render:
                continue
            if len(groups) == 1:
                return self.corrupt(x, domain.corruption, domain.severity, preset=self.preset,
                                    generator=self.generators(domain, positions))
            mask = batch.domains == d
            sel = torch.from_numpy(np.flatnonzero(mask)).to(x.device)
            if out is x:
                out = x.clone()
            out[sel] = self.corrupt(x[sel], domain.corruption, domain.severity, preset=self.preset,
                                    generator=self.generators(domain, positions[mask]))
        return out


def _fisher_batches(data: Mapping[str, Any], method: Mapping[str, Any], device: torch.device,
                    input_size, seed: int, bad_files: list[tuple[str, str]]) -> list[Tensor]:
    root = data.get("source_root")
    name = method["name"]
    if not root:
        raise ValueError(
            f"method {name} needs clean source images for its Fisher regulariser: set "
            f"data.source_root=<ImageFolder of training images of the same data set>, or "
            f"method.fisher_alpha=0 (that is method=eta)"
        )
    size = int(method.get("fisher_size") or 2000)
    img_size = data.get("image_size") or (input_size[0] if input_size else None)
    images = load_source_images(root, size, size=img_size, crop_ratio=float(data.get("crop_ratio", 1.0)),
                                seed=seed, num_workers=int(data.get("num_workers") or 0),
                                skip_bad_files=bool(data.get("skip_bad_files", False)), bad_files=bad_files)
    return [
        _to_model_size(images[i: i + FISHER_BATCH_SIZE].to(device).float().div_(255), input_size)
        for i in range(0, len(images), FISHER_BATCH_SIZE)
    ]


#: Mid-stream checkpoint of a run, in its output folder.
CHECKPOINT = "checkpoint.pt"


def _save_checkpoint(path: Path, chash: str, position: int, method: torch.nn.Module, device: torch.device,
                     correct: Tensor, confidence: Tensor, records: list, step_s: list[float]) -> None:
    """Everything a resumed run needs to end with the numbers of an uninterrupted
    one, written atomically (a kill during the write leaves the previous one)."""
    state = {
        "config_hash": chash,
        "position": position,
        "method": method.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "correct": correct.cpu(),
        "confidence": confidence.cpu(),
        "records": records,
        "step_s": list(step_s),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(path: Path, chash: str, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means: start over
        log.warning("ignoring unreadable checkpoint %s (%s): starting the stream from the beginning", path, err)
        return None
    if state.get("config_hash") != chash:
        log.warning("ignoring %s: it belongs to a different config; starting from the beginning", path)
        return None
    return state


def _existing(out: Path, chash: str) -> dict[str, Any] | None:
    old = load_results(out / RESULTS_JSON)
    return old if old is not None and old.get("config_hash") == chash else None


def run_benchmark(
    cfg: DictConfig | Mapping[str, Any],
    output_dir: str | Path,
    *,
    hydra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one benchmark job described by ``cfg`` (the composed ``bench`` config)
    and write its results to ``output_dir``; return the results dict.

    When ``run.skip_existing`` is set and ``output_dir`` already holds the
    ``results.json`` of a config with the same hash, that is returned instead and
    nothing runs.
    """
    register_resolvers()
    out = Path(output_dir)
    # Types and ranges are checked here, once, before anything reads the values.
    plain = validate_config(cfg)
    chash = config_hash(plain)
    if plain["run"].get("skip_existing", True):
        old = _existing(out, chash)
        if old is not None and old.get("num_bad_files") and not plain["data"].get("skip_bad_files", False):
            # data.skip_bad_files does not change the hash (it never changes the
            # numbers of a run on readable files), but these numbers left files out.
            log.info("not reusing %s: it left out %d bad image files, and data.skip_bad_files is false",
                     out / RESULTS_JSON, old["num_bad_files"])
            old = None
        if old is not None:
            log.info("skipping %s: %s holds results of the same config (hash %s)", out, RESULTS_JSON, chash[:12])
            old["skipped"] = True
            return old

    previous_threads = torch.get_num_threads()
    try:
        return _run(plain, chash, out, hydra_info)
    finally:
        # run.num_threads is a per-run setting: do not leak it into the caller.
        torch.set_num_threads(previous_threads)


def _run(plain: dict[str, Any], chash: str, out: Path, hydra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    import tta

    run, data, scenario, mcfg = plain["run"], plain["data"], plain["scenario"], plain["method"]
    started = datetime.now(timezone.utc)
    t_setup = time.perf_counter()
    seed = int(run.get("seed", 0))
    torch.manual_seed(seed)
    if run.get("num_threads"):
        torch.set_num_threads(int(run["num_threads"]))
    device = resolve_device(run.get("device", "auto"))

    model_cfg = plain["model"]
    model = tta.load_model(model_cfg["name"], weights=model_cfg.get("weights"),
                           pretrained=bool(model_cfg.get("pretrained", True))).to(device)
    input_size = getattr(model, "input_size", None)
    domains, num_classes = build_domains(data, scenario, input_size=input_size, seed=seed)
    model_classes = getattr(model, "num_classes", None)
    if num_classes is not None and model_classes is not None and num_classes != model_classes:
        raise ValueError(
            f"data {data.get('name')} has {num_classes} classes but model {model_cfg['name']} predicts "
            f"{model_classes}: pick a matching model (or data.class_index)"
        )
    max_label = max(int(d.labels.max()) for d in domains)
    if model_classes is not None and max_label >= model_classes:
        raise ValueError(f"labels go up to {max_label} but model {model_cfg['name']} predicts {model_classes} classes")
    batch_size = int(run["batch_size"])
    stream = build_stream(domains, scenario, batch_size, seed, num_classes or model_classes)
    loader = BatchLoader(stream, device, cache_mb=float(data.get("cache_mb", 4096)),
                         num_workers=int(data.get("num_workers") or 0), seed=seed)

    # Files left out by data.skip_bad_files (the check before streaming), test and source images.
    bad_files = list(dict.fromkeys(b for pool in {id(d.pool): d.pool for d in domains}.values()
                                   for b in getattr(pool, "bad_files", ())))
    name, overrides = method_overrides(mcfg)
    preset = method_preset(mcfg, data.get("name"))
    # What the method will run with: its defaults, the preset, then the config's changes.
    effective = {**tta.method_defaults(name, preset=preset), **overrides, "name": name}
    if "fisher_loader" in effective and float(effective.get("fisher_alpha") or 0) > 0:
        overrides["fisher_loader"] = _fisher_batches(data, effective, device, input_size, seed, bad_files)
    if bad_files:
        log.warning("data.skip_bad_files: left out %d unreadable image file(s) (listed in %s):\n%s",
                    len(bad_files), RESULTS_JSON, "\n".join(f"  {p}: {r}" for p, r in bad_files))
    method = tta.wrap(model, name, preset=preset, **overrides)
    renderer = _Renderer(stream, device, seed, data.get("preset")) if any(d.render for d in domains) else None
    loader.prepare()
    setup_s = time.perf_counter() - t_setup
    log.info("%s on %s/%s (%s): %s, %s, %s of %d, device %s, %s",
             name, data.get("name"), scenario.get("name"), model_cfg["name"], _count(len(domains), "domain"),
             _count(len(stream), "image"), _count(len(loader), "batch"), batch_size, device,
             "tensor cache" if loader.cached else "DataLoader workers")

    from tqdm.auto import tqdm

    ckpt_path = out / CHECKPOINT
    resumed = _load_checkpoint(ckpt_path, chash, device)
    start = 0
    correct_parts: list[Tensor] = []
    conf_parts: list[Tensor] = []
    records: list[Any] = []
    step_s: list[float] = []
    if resumed is not None:
        start = int(resumed["position"])
        method.load_state_dict(resumed["method"])
        torch.set_rng_state(resumed["rng"])
        if device.type == "cuda" and resumed.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        correct_parts, conf_parts = [resumed["correct"].to(device)], [resumed["confidence"].to(device)]
        records, step_s = list(resumed["records"]), list(resumed["step_s"])
        log.info("resuming from %s at batch %d of %d", ckpt_path, start, len(loader))
    every = int(run.get("checkpoint_every") or 0)
    every_s = 60.0 * float(run.get("checkpoint_minutes") or 0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seen = stream.batches[start][0] if start < len(stream.batches) else len(stream)
    n_correct = torch.zeros((), dtype=torch.long, device=device)
    if correct_parts:
        n_correct += correct_parts[0].sum()
    last_refresh = 0.0
    t_first = 0.0
    bar = tqdm(total=len(stream), initial=seen, unit="img", desc=name, disable=not run.get("progress", True),
               dynamic_ncols=True, mininterval=0.5)
    eta = _TimeEstimate(len(stream) - seen)
    t_loop = last_ckpt = time.perf_counter()
    for batch in loader.iter_from(start):
        if batch.reset:
            method.reset()
        x = batch.images.float().div_(255)
        if renderer is not None:
            x = renderer(x, batch)
        x = _to_model_size(x, input_size)
        _sync(device)
        t0 = time.perf_counter()
        logits = method(x)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        with torch.no_grad():
            conf, pred = logits.detach().float().softmax(1).max(1)
            correct = pred == batch.labels
        correct_parts.append(correct)
        conf_parts.append(conf)
        records.append(method.last_record)
        if batch.index == start:
            t_first = time.perf_counter()
        n_correct += correct.sum()
        seen += len(correct)
        bar.update(len(correct))
        now = time.perf_counter()
        eta.update(len(correct), now)
        if not bar.disable and now - last_refresh > 0.5:
            last_refresh = now
            doms = {stream.domains[int(d)].name for d in np.unique(batch.domains)}
            bar.set_postfix_str(f"err={100 * (1 - n_correct.item() / seen):.1f}% "
                                f"domain={doms.pop() if len(doms) == 1 else 'mixed'}", refresh=False)
        position = batch.index + 1
        if position < len(loader) and ((every and position % every == 0) or (every_s and now - last_ckpt >= every_s)):
            correct_parts, conf_parts = [torch.cat(correct_parts)], [torch.cat(conf_parts)]
            records = _record_dicts(records)
            _save_checkpoint(ckpt_path, chash, position, method, device, correct_parts[0], conf_parts[0],
                             records, step_s)
            last_ckpt = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    loop_s = t_end - t_loop
    bar.close()
    # Throughput leaves out the first step when there are others: it pays one-off
    # costs (allocator warm-up, kernel selection, optimizer state creation). After a
    # resume, the end-to-end rate covers the resumed part only.
    sizes = [e - s for s, e in stream.batches]
    warm = 1 if len(step_s) > 1 else 0
    adapt_s = sum(step_s[warm:])
    seg_warm = 1 if len(stream.batches) - start > 1 else 0
    e2e_s = (t_end - t_first) if seg_warm else loop_s
    timed_images = sum(sizes[warm:])
    e2e_images = sum(sizes[start + seg_warm:])
    peak_mb, peak_kind = peak_memory_mb(device)

    results = _summarise(stream, correct_parts, conf_parts, records, run)
    results["steps"]["seconds"] = step_s
    results.update({
        "method": name,
        "model": model_cfg["name"],
        "data": data.get("name"),
        "scenario": scenario.get("name"),
        "images_per_s": timed_images / adapt_s if adapt_s > 0 else None,
        "images_per_s_end_to_end": e2e_images / e2e_s if e2e_s > 0 else None,
        "resumed_at_batch": start if resumed is not None else None,
        "seconds": {"setup": setup_s, "adapt": sum(step_s), "loop": loop_s,
                    "first_step": step_s[0] if step_s else None},
        "peak_mem_mb": peak_mb,
        "peak_mem_kind": peak_kind,
        "batch_size": batch_size,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "num_threads": torch.get_num_threads(),
        "loader": "tensor_cache" if loader.cached else "dataloader",
        "num_bad_files": len(bad_files),
        "bad_files": [{"path": p, "reason": r} for p, r in bad_files],
        "config": plain,
        "config_hash": chash,
        "method_preset": preset,
        "method_overrides": {k: v for k, v in overrides.items() if k != "fisher_loader"},
        "versions": versions(),
        "git": git_info(),
        "hydra": dict(hydra_info or {}),
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    # Key order: the summary first, the bulky parts last.
    order = ["method", "model", "data", "scenario", "error", "mean_error", "ece", "mean_ece",
             "images_per_s", "images_per_s_end_to_end", "peak_mem_mb", "peak_mem_kind"]
    results = {**{k: results[k] for k in order if k in results},
               **{k: v for k, v in results.items() if k not in order and k != "steps"},
               "steps": results["steps"]}
    results = round_figures(results)
    write_results(out, results, plot=bool(run.get("plot", True)))
    ckpt_path.unlink(missing_ok=True)
    rate = results["images_per_s"]
    log.info("%s: mean error %.2f%% over %s, %s (adaptation), results in %s",
             name, results["mean_error"], _count(len(results["error"]), "domain"),
             f"{rate:.3g} images/s" if rate else "images/s not measured (no timed step)", out)
    return results


def _count(n: int, noun: str) -> str:
    """``1 domain``, ``2 domains``, ``3 batches``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('ch', 'sh', 's', 'x')) else 's'}"


class _TimeEstimate:
    """Logs, once, how long a long run will take: after its first batches (at
    least ``after_s`` seconds past the first, which pays one-off costs), when
    the remaining images would take over ``min_s`` at the rate seen so far."""

    def __init__(self, total: int, *, after_batches: int = 3, after_s: float = 5.0, min_s: float = 60.0) -> None:
        self.remaining, self.after_batches, self.after_s, self.min_s = total, after_batches, after_s, min_s
        self.batches, self.images, self.t0 = 0, 0, None
        self.done = False

    def update(self, num_images: int, now: float) -> None:
        self.remaining -= num_images
        if self.done:
            return
        if self.t0 is None:  # the clock starts after the first batch
            self.t0 = now
            return
        self.batches += 1
        self.images += num_images
        elapsed = now - self.t0
        if self.batches < self.after_batches or elapsed < self.after_s:
            return
        self.done = True
        left = self.remaining * elapsed / max(1, self.images)
        if left >= self.min_s:
            log.info("estimated time left: %s for %s at %.3g images/s (data.num_images and "
                     "data.corruptions set the run's size)", _duration(left), _count(self.remaining, "image"),
                     self.images / elapsed)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(1, minutes)} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _record_dicts(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Step records as plain dicts (a checkpoint stores them so; methods that do not
    step leave ``None``)."""
    return [r.to_dict() if isinstance(r, StepRecord) else (r or {}) for r in records]


def _summarise(stream: Stream, correct_parts, conf_parts, records, run) -> dict[str, Any]:
    correct = torch.cat(correct_parts).cpu().numpy()
    confidence = torch.cat(conf_parts).cpu().numpy().astype(np.float64)
    names = [d.name for d in stream.domains]
    ordered = list(dict.fromkeys(names))
    elem_name = np.array(names, dtype=object)[stream.dom]
    error, ece, domains = {}, {}, []
    for n in ordered:
        sel = elem_name == n
        error[n] = float(100.0 * (1.0 - correct[sel].mean()))
        if run.get("ece", True):
            ece[n] = float(expected_calibration_error(confidence[sel], correct[sel], int(run.get("ece_bins", 15))))
        first = stream.domains[names.index(n)]
        domains.append({"name": n, "corruption": first.corruption, "severity": first.severity,
                        "num_images": int(sel.sum())})

    steps: dict[str, list] = {"domain": [], "num_samples": [], "num_selected": [], "loss": [], "error": []}
    extra_keys: list[str] = []
    dicts = _record_dicts(records)
    for d in dicts:
        extra_keys += [k for k in d if k not in steps and k not in extra_keys]
    for k in extra_keys:
        steps[k] = []
    selected = {n: [0, 0] for n in ordered}
    for (s, e), rec in zip(stream.batches, dicts):
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
