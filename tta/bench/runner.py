"""One benchmark job as a pipeline of named stages, read top to bottom in
:func:`run_benchmark`:

1. **config**: the composed config read once into typed dataclasses
   (:func:`~tta.bench.settings.read_config`), and a finished run of the same
   config reused;
2. **setup**: seed, threads, device and model (:func:`setup`);
3. **stream**: domains, order, batches and loader
   (:func:`~tta.bench.stream.open_stream`), and the model input of each batch
   (:class:`~tta.bench.render.BatchRenderer`);
4. **method**: the method wrapped with its preset and overrides, and the source
   images some methods need (:func:`wrap_method`, :mod:`.source_data`);
5. **adapt loop**: resumed from a checkpoint if there is one
   (:func:`~tta.bench.loop.adapt`);
6. **metrics** and **write**: the results dict (:func:`~tta.bench.results.build_results`)
   written as results.json/.csv/.png.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from .checkpoint import CHECKPOINT, Progress, load_checkpoint
from .config import config_changes, method_overrides, method_preset, register_resolvers
from .loop import Checkpointing, adapt, count
from .metrics import summarise, throughput
from .render import BatchRenderer, to_model_size
from .results import RESULTS_JSON, build_results, code_changes, load_results, write_results
from .settings import BenchConfig, DataConfig, read_config
from .source_data import SOURCE_OPTIONS, SourceBatches, load_source_images, source_reading_progress
from .stream import bad_files, open_stream

__all__ = ["run_benchmark", "resolve_device", "setup", "wrap_method", "Setup", "FISHER_BATCH_SIZE"]

log = logging.getLogger("tta.bench")

#: Batch size of the clean source images that estimate EATA's Fisher information
#: when the run's batch size is 1 (the paper's test batch size: a Fisher of single
#: images would be another quantity). Otherwise the run's batch size, as both the
#: official code (ImageNet, 64) and the port (CIFAR, 200) batch it: the Fisher is the
#: squared gradient of a batch's mean loss, about 3x larger at 64 than at 200 images.
FISHER_BATCH_SIZE = 64


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
    config = read_config(cfg)  # types and ranges checked here, once
    if config.run.skip_existing:
        old = _finished_run(out, config)
        if old is not None:
            return old
    previous_threads = torch.get_num_threads()
    try:
        return _run(config, out, hydra_info)
    finally:
        # run.num_threads is a per-run setting: do not leak it into the caller.
        torch.set_num_threads(previous_threads)


def _run(config: BenchConfig, out: Path, hydra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    started = datetime.now(timezone.utc)
    t_setup = time.perf_counter()
    job = setup(config)
    stream, loader = open_stream(config.data, config.scenario, config.run, job.device, input_size=job.input_size,
                                 model_classes=getattr(job.model, "num_classes", None),
                                 model_name=config.model.name)
    left_out = bad_files(stream)
    method, preset, overrides = wrap_method(config, job, left_out)
    if left_out:
        log.warning("data.skip_bad_files: left out %d unreadable image file(s) (listed in %s):\n%s",
                    len(left_out), RESULTS_JSON, "\n".join(f"  {p}: {r}" for p, r in left_out))
    render = BatchRenderer(stream, seed=config.run.seed, preset=config.data.preset, input_size=job.input_size)
    loader.prepare()
    setup_s = time.perf_counter() - t_setup
    name = config.method["name"]
    sizes = sorted({e - s for s, e in stream.batches})  # as cut: a domain's last may differ
    log.info("%s on %s/%s (%s): %s, %s, %s of %s, device %s, %s",
             name, config.data.name, config.scenario.name, config.model.name, count(len(stream.domains), "domain"),
             count(len(stream), "image"), count(len(loader), "batch"),
             sizes[0] if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}", job.device,
             "tensor cache" if loader.cached else "DataLoader workers")

    ckpt_path = out / CHECKPOINT
    progress = load_checkpoint(ckpt_path, config.hash, method, job.device, config.plain)
    resumed_at = None if progress is None else progress.position
    if progress is None:
        progress = Progress()
    else:
        log.info("resuming from %s at batch %d of %d", ckpt_path, resumed_at, len(loader))
    if job.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.device)
    checkpointing = Checkpointing(ckpt_path, config.hash, config.plain, every=config.run.checkpoint_every or 0,
                                  every_s=60.0 * (config.run.checkpoint_minutes or 0))
    timing = adapt(method, loader, render, progress, checkpointing=checkpointing,
                   show_progress=config.run.progress, desc=name)

    summary = summarise(stream, progress, method.record_type.columns(),
                        ece_bins=config.run.ece_bins if config.run.ece else None)
    speed = throughput(stream, resumed_at or 0, progress.step_s, timing.loop, timing.first_done)
    results = build_results(
        config, summary, speed, progress.step_s, device=job.device, loader=loader, left_out=left_out,
        preset=preset, overrides=overrides, resumed_at=resumed_at, hydra_info=hydra_info, started=started,
        seconds={"setup": setup_s, "adapt": sum(progress.step_s), "loop": timing.loop,
                 "first_step": progress.step_s[0] if progress.step_s else None},
    )
    write_results(out, results, plot=config.run.plot)
    ckpt_path.unlink(missing_ok=True)
    rate = results["images_per_s"]
    log.info("%s: mean error %.2f%% over %s, %s (adaptation), results in %s",
             name, results["mean_error"], count(len(results["error"]), "domain"),
             f"{rate:.3g} images/s" if rate else "images/s not measured (no timed step)", out)
    return results


def _finished_run(out: Path, config: BenchConfig) -> dict[str, Any] | None:
    """The results in ``out`` of a finished run of the same config, if any."""
    old = load_results(out / RESULTS_JSON)
    if old is None:
        return None
    if old.get("config_hash") != config.hash:
        if isinstance(old.get("config"), Mapping):
            log.info("rerunning %s: %s holds results of another config (%s)", out, RESULTS_JSON,
                     config_changes(old["config"], config.plain))
        return None
    if old.get("num_bad_files") and not config.data.skip_bad_files:
        # data.skip_bad_files does not change the hash (it never changes the
        # numbers of a run on readable files), but these numbers left files out.
        log.info("not reusing %s: it left out %d bad image files, and data.skip_bad_files is false",
                 out / RESULTS_JSON, old["num_bad_files"])
        return None
    changed = code_changes(old)
    if changed:
        # the hash is of the config only: a fix in tta or a new torch can move the
        # numbers, and a sweep would then mix results of two codes without a word
        log.warning("skipping %s: %s holds results of the same config, made by other code (%s); delete it "
                    "or set run.skip_existing=false to run it again", out, RESULTS_JSON, changed)
    else:
        log.info("skipping %s: %s holds results of the same config (hash %s)", out, RESULTS_JSON, config.hash[:12])
    old["skipped"] = True
    return old


# ----------------------------------------------------------------------------------
# Setup: seed, threads, device, model
# ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """The machine side of a job: the device and the model on it."""

    device: torch.device
    model: nn.Module

    @property
    def input_size(self) -> Sequence[int] | None:
        return getattr(self.model, "input_size", None)


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; cuda without a GPU is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            # submitit's local executor does this unless told gpus_per_node: a sweep
            # meant for the GPU would run on the CPU, hours slower, and say nothing
            log.warning("run.device=auto: CUDA_VISIBLE_DEVICES is empty, so no GPU is visible and the job runs "
                        "on the CPU (with hydra/launcher=submitit_local, add hydra.launcher.gpus_per_node=1)")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "meta":
        # meta tensors hold no values: the run would decode the data, load the
        # model and wrap the method before failing on the first batch with
        # torch's "META device type not an accelerator"
        raise RuntimeError(f"run.device={name} holds no data (tensors without values), so nothing can be "
                           "measured on it; use run.device=cpu (or cuda, or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name} but torch sees no CUDA device; use run.device=cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # a device type this torch build lacks (mps, xpu, ...)
        # torch's own message lists every dispatch key: its first sentence says enough
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise RuntimeError(f"run.device={name} cannot be used with this torch build ({reason}); "
                           "use run.device=cpu (or cuda, or auto)") from None
    return device


def setup(config: BenchConfig) -> Setup:
    """Seed torch (first: a model built without weights draws its initialisation),
    set the threads, pick the device and load the model onto it."""
    import tta

    torch.manual_seed(config.run.seed)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    device = resolve_device(config.run.device)
    model = tta.load_model(config.model.name, weights=config.model.weights, pretrained=config.model.pretrained)
    return Setup(device, model.to(device))


# ----------------------------------------------------------------------------------
# Method: the preset, the config's overrides and the source data some methods need
# ----------------------------------------------------------------------------------


def wrap_method(config: BenchConfig, job: Setup, left_out: list[tuple[str, str]]
                ) -> tuple[nn.Module, str | None, dict[str, Any]]:
    """The wrapped method, its preset and the overrides the config gives (its
    values that differ from the preset's; see
    :func:`~tta.bench.config.method_overrides`). Methods with a Fisher regulariser
    get their clean source images from ``data.source_root`` (files left out of
    them are added to ``left_out``)."""
    import tta

    preset = method_preset(config.method, config.data.name)
    name, overrides = method_overrides(config.method, preset)
    # What the method will run with: its defaults, the preset, then the config's changes.
    effective = {**tta.method_defaults(name, preset=preset), **overrides}
    passed = dict(overrides)
    if "fisher_loader" in effective and float(effective.get("fisher_alpha") or 0) > 0:
        passed["fisher_loader"] = _fisher_batches(config.data, name, int(effective["fisher_size"]), job,
                                                  config.run.seed, left_out, config.run.batch_size)
    if "source_loader" in effective and config.data.source_root:
        # Methods that learn from labelled source data (without it they say what to set).
        data = config.data
        passed["source_loader"] = SourceBatches(
            data.source_root, config.run.batch_size, device=job.device,
            size=data.image_size or (job.input_size[0] if job.input_size else None), crop_ratio=data.crop_ratio,
            seed=config.run.seed, num_workers=data.num_workers, input_size=job.input_size,
            skip_bad_files=data.skip_bad_files, bad_files=left_out)
    if effective.get("compile"):
        # A sweep's jobs run one after another in this process, and dynamo keeps its
        # compiled code per code object (every model's forward): each job's models
        # would add entries until its recompile limit (8), after which later jobs
        # silently run eagerly. Jobs are independent: start from empty caches.
        torch._dynamo.reset()
    if any(k in passed for k in SOURCE_OPTIONS):
        log.info("%s: reading source images from %s to set up", name, config.data.source_root)
    with source_reading_progress(passed, name, config.run.progress):
        method = tta.wrap(job.model, name, preset=preset, **passed)
    return method, preset, overrides


def _fisher_batches(data: DataConfig, method: str, size: int, job: Setup, seed: int,
                    left_out: list[tuple[str, str]], batch_size: int = 1) -> list[Tensor]:
    if not data.source_root:
        raise ValueError(
            f"method {method} needs clean source images for its Fisher regulariser: set "
            f"data.source_root=<ImageFolder of training images of the same data set>, or "
            f"method.fisher_alpha=0 (that is method=eta)"
        )
    img_size = data.image_size or (job.input_size[0] if job.input_size else None)
    images = load_source_images(data.source_root, size, size=img_size, crop_ratio=data.crop_ratio, seed=seed,
                                num_workers=data.num_workers, skip_bad_files=data.skip_bad_files,
                                bad_files=left_out)
    batch = batch_size if batch_size > 1 else FISHER_BATCH_SIZE
    return [
        to_model_size(images[i: i + batch].to(job.device).float().div_(255), job.input_size)
        for i in range(0, len(images), batch)
    ]
