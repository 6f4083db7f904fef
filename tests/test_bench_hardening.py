"""tta.bench hardening: the loader's two paths give the same numbers (and resume to
them), bad image files are found before streaming, config values are checked when
the config is read, and the report names the results it cannot read.

Runs offline on $TTA_HOME (the shared CIFAR-10 JPEGs and ResNet-20 weights) with
streams of a few batches of 8 images; bad-file tests copy a handful of the shared
JPEGs into a temporary folder (the shared folder is never written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hydra")

import tta  # noqa: E402
import tta.methods.base as methods_base  # noqa: E402
from tta.bench import compose_config, run_benchmark  # noqa: E402
from tta.bench.sources import build_domains  # noqa: E402
from tta.bench.stream import BatchLoader, build_stream  # noqa: E402

CIFAR_TEST = tta.tta_home() / "data" / "cifar10" / "test"
needs_cifar = pytest.mark.skipif(
    not CIFAR_TEST.is_dir() or not (tta.tta_home() / "models" / "cifar10").is_dir(),
    reason="needs $TTA_HOME/data/cifar10 and $TTA_HOME/models/cifar10",
)

TINY = ["data.corruptions=[contrast,pixelate]", "data.num_images=16", "run.batch_size=8",
        "run.device=cpu", "run.progress=false", "run.plot=false", "run.num_threads=1",
        "run.skip_existing=false"]
#: The DataLoader path (sets over data.cache_mb stream through it, e.g. ImageNet-C).
DATALOADER = ["data.cache_mb=0", "data.num_workers=0"]


# ----------------------------------------------------------------------------------
# 1. Tensor cache and DataLoader give the same numbers, and resume to them
# ----------------------------------------------------------------------------------


class _Interrupted(Exception):
    """Stands in for a kill: raised from the method's forward mid-stream."""


class _Recorder:
    """Patches the methods' forward to keep every batch's logits (and, with
    ``stop_after``, to stop the run there, as a kill would)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        self.logits: list[torch.Tensor] = []
        forward = methods_base.TTAMethod.forward

        def recording(method, x):
            if stop_after is not None and len(self.logits) >= stop_after:
                raise _Interrupted
            out = forward(method, x)
            self.logits.append(out.detach().clone())
            return out

        monkeypatch.setattr(methods_base.TTAMethod, "forward", recording)


def _deyo_run(monkeypatch, out: Path, extra: list[str], stop_after: int | None = None):
    with monkeypatch.context() as m:
        rec = _Recorder(m, stop_after)
        cfg = compose_config([*TINY, "method=deyo", "run.checkpoint_every=1", *extra])
        if stop_after is None:
            return run_benchmark(cfg, out), rec.logits
        with pytest.raises(_Interrupted):
            run_benchmark(cfg, out)
        assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
        return None, rec.logits


def _same_numbers(a: dict, b: dict) -> None:
    assert a["config_hash"] == b["config_hash"]
    assert a["error"] == b["error"] and a["ece"] == b["ece"]
    for key in ("error", "loss", "num_selected"):
        assert a["steps"][key] == b["steps"][key], key


@needs_cifar
def test_loader_paths_do_not_touch_the_global_rng() -> None:
    cfg = compose_config(TINY)
    domains, _ = build_domains(cfg.data, cfg.scenario, seed=0)
    stream = build_stream(domains, cfg.scenario, 8, 0)
    for loader in (BatchLoader(stream, torch.device("cpu"), seed=0),
                   BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=0, seed=0),
                   BatchLoader(stream, torch.device("cpu"), cache_mb=0, num_workers=1, seed=0)):
        loader.prepare()
        torch.manual_seed(123)
        before = torch.get_rng_state()
        batches = list(loader.iter_from(1))
        assert len(batches) == len(loader) - 1
        assert torch.equal(torch.get_rng_state(), before), f"cached={loader.cached} moved the global RNG"


@needs_cifar
def test_deyo_gives_the_same_numbers_on_both_loader_paths_and_after_resume(tmp_path, monkeypatch) -> None:
    ref, ref_logits = _deyo_run(monkeypatch, tmp_path / "cache", [])
    assert ref["loader"] == "tensor_cache" and len(ref_logits) == 4
    streamed, streamed_logits = _deyo_run(monkeypatch, tmp_path / "dataloader", DATALOADER)
    assert streamed["loader"] == "dataloader"
    _same_numbers(streamed, ref)
    # Per batch: the same logits, not only the same error counts.
    assert all(torch.equal(p, q) for p, q in zip(streamed_logits, ref_logits))

    # Stopped after two batches (checkpoints every batch), then started again: on
    # either path (and across paths: data.cache_mb does not change the config
    # hash) the resumed run ends with the uninterrupted numbers.
    for name, first, second in (("cache", [], []), ("dataloader", DATALOADER, DATALOADER),
                                ("cache_then_dataloader", [], DATALOADER)):
        out = tmp_path / f"resume_{name}"
        _, head = _deyo_run(monkeypatch, out, first, stop_after=2)
        res, tail = _deyo_run(monkeypatch, out, second)
        assert res["resumed_at_batch"] == 2, name
        _same_numbers(res, ref)
        assert all(torch.equal(p, q) for p, q in zip(head + tail, ref_logits)), name
