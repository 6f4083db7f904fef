"""The adaptation loop of a run: each batch of the stream rendered, passed to the
method, scored; with a progress bar, an estimate of the time left, and mid-stream
checkpoints."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .checkpoint import Progress, save_checkpoint
from .render import BatchRenderer
from .stream import BatchLoader

__all__ = ["Checkpointing", "LoopTiming", "TimeEstimate", "adapt", "count"]

log = logging.getLogger("tta.bench")


@dataclass
class LoopTiming:
    """Seconds of the loop: ``loop`` in all, ``first_done`` from its start to the
    end of its first batch (None when it ran none)."""

    loop: float
    first_done: float | None


@dataclass
class Checkpointing:
    """Where and how often the loop checkpoints: every ``every`` batches and at
    least every ``every_s`` seconds of streaming (0 turns either off)."""

    path: Path
    config_hash: str
    config: Mapping[str, Any] | None = None
    every: int = 0
    every_s: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adapt(method: nn.Module, loader: BatchLoader, render: BatchRenderer, progress: Progress, *,
          checkpointing: Checkpointing, show_progress: bool, desc: str) -> LoopTiming:
    """Stream the batches from ``progress.position`` on through ``method``,
    appending to ``progress`` what each step gives. The method call alone is timed
    (synchronised on a GPU), so a step's seconds leave loading and rendering out."""
    from tqdm.auto import tqdm

    stream, device = loader.stream, loader.device
    start = progress.position
    seen = stream.batches[start][0] if start < len(stream.batches) else len(stream)
    n_correct = torch.zeros((), dtype=torch.long, device=device)
    for part in progress.correct:
        n_correct += part.sum()
    bar = tqdm(total=len(stream), initial=seen, unit="img", desc=desc, disable=not show_progress,
               dynamic_ncols=True, mininterval=0.5)
    eta = TimeEstimate(len(stream) - seen)
    last_refresh, first_done = 0.0, None
    t_loop = last_ckpt = time.perf_counter()
    for batch in loader.iter_from(start):
        if batch.reset:
            method.reset()
        x = render(batch)
        _sync(device)
        t0 = time.perf_counter()
        logits = method(x)
        _sync(device)
        progress.step_s.append(time.perf_counter() - t0)
        with torch.no_grad():
            conf, pred = logits.detach().float().softmax(1).max(1)
            correct = pred == batch.labels
        progress.correct.append(correct)
        progress.confidence.append(conf)
        progress.records.append(method.last_record)
        progress.position = batch.index + 1
        now = time.perf_counter()
        if first_done is None:
            first_done = now - t_loop
        n_correct += correct.sum()
        seen += len(correct)
        bar.update(len(correct))
        eta.update(len(correct), now)
        if not bar.disable and now - last_refresh > 0.5:
            # The running error costs a sync: only when the bar shows it.
            last_refresh = now
            doms = {stream.domains[int(d)].name for d in np.unique(batch.domains)}
            bar.set_postfix_str(f"err={100 * (1 - n_correct.item() / seen):.1f}% "
                                f"domain={doms.pop() if len(doms) == 1 else 'mixed'}", refresh=False)
        c = checkpointing
        if progress.position < len(loader) and ((c.every and progress.position % c.every == 0)
                                               or (c.every_s and now - last_ckpt >= c.every_s)):
            save_checkpoint(c.path, c.config_hash, progress, method, device, c.config)
            last_ckpt = time.perf_counter()
    _sync(device)
    loop_s = time.perf_counter() - t_loop
    if not bar.disable and seen:
        # the postfix is refreshed twice a second: the last one may be of an earlier domain
        bar.set_postfix_str(f"err={100 * (1 - n_correct.item() / seen):.1f}%", refresh=False)
    bar.close()
    return LoopTiming(loop_s, first_done)


def count(n: int, noun: str) -> str:
    """``1 domain``, ``2 domains``, ``3 batches``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('ch', 'sh', 's', 'x')) else 's'}"


class TimeEstimate:
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
                     "data.corruptions set the run's size)", _duration(left), count(self.remaining, "image"),
                     self.images / elapsed)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(1, minutes)} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
