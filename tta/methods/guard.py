"""Collapse guard: reset an adapting model that has collapsed, and fall back to the
source model where test-time statistics mislead.

Entropy minimisation has a trivial optimum: predict one class with certainty. On
long, label-sorted or very hard streams gradient methods can slide into it and stay
there, or drift, at too high a step size, into a model that is confidently wrong while
its predictions stay spread over the classes. Test-batch statistics fail differently:
on a stream of one class (or a few) they remove the class signal itself, and every
model that normalises with them is wrong, adapted or not.

The guard keeps one frozen copy of the source model and runs it two ways: with the
method's test-time normalisation (the *unadapted* model: what the stream looks like
before any parameter update) and with the source statistics (the source model as it
was). Over a window of batches it asks two questions:

- *Have the parameters diverged?* The adapted model shares fewer than
  ``min_agreement`` of its predictions with the unadapted one and is degenerate (one
  class dominates, or the entropy is about zero) or at least as sure of itself as the
  unadapted model. Then it resets the method to the source state, as SAR's recovery
  and RDumb's resets do, and counts the event.
- *Do the test statistics mislead?* (BatchNorm models with test statistics only.) The
  unadapted model shares fewer than ``min_agreement`` of its predictions with the
  source model and is far less sure (its mean entropy above
  ``statistics_entropy_ratio`` times the source model's): under covariate shift, test
  statistics make a model surer, under label shift they make it unsure. While that
  holds, the guard reports the source model's predictions (adaptation goes on
  underneath), and counts the batches.

Comparing the adapted model with the source model directly answers neither: on
severity-5 noise a healthy Tent shares only 14-20% of its predictions with the source
model (which is 83% wrong there), as little as a model destroyed by a too-large step.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from .entropy import softmax_entropy

log = logging.getLogger("tta")

__all__ = ["CollapseGuard"]


@dataclass
class CollapseGuard:
    """Settings of the collapse guard (``collapse_guard=True`` uses the defaults, a
    dict overrides them).

    Args:
        window: batches over which agreement and class spread are measured.
        min_agreement: below this fraction of predictions shared with the
            unadapted model, the adapted model is suspect.
        max_class_fraction: a suspect model whose most frequent class exceeds this
            fraction of the window's predictions has collapsed...
        entropy_floor: ...as has one whose mean entropy falls below this fraction
            of ``ln C``.
        statistics_entropy_ratio: the unadapted model counts as misled by its test
            statistics when its mean entropy exceeds this multiple of the source
            model's (and they agree on fewer than ``min_agreement``); ``None`` never
            falls back to the source model.
        check_every: check every this many batches (each check costs one no-grad
            forward of the source copy, two for BatchNorm models with test
            statistics, and one host sync once the window is full).
    """

    window: int = 5
    min_agreement: float = 0.5
    max_class_fraction: float = 0.3
    entropy_floor: float = 0.02
    statistics_entropy_ratio: float | None = 1.75
    check_every: int = 1

    def __post_init__(self) -> None:
        if self.window < 1 or self.check_every < 1:
            raise ValueError("collapse_guard window and check_every must be >= 1")
        if self.statistics_entropy_ratio is not None and self.statistics_entropy_ratio <= 0:
            raise ValueError("collapse_guard statistics_entropy_ratio must be > 0 (or None to disable)")
        self.num_collapses = 0
        self.num_fallback_batches = 0
        self.fallback = False
        self._history: deque = deque(maxlen=self.window)
        self._reference: nn.Module | None = None
        self._batches = 0

    @classmethod
    def from_option(cls, option: "bool | dict | CollapseGuard | None") -> "CollapseGuard | None":
        if option is None or option is False:
            return None
        if option is True:
            return cls()
        if isinstance(option, CollapseGuard):
            return option
        if isinstance(option, dict):
            known = [k for k in inspect.signature(cls).parameters]
            unknown = sorted(set(option) - set(known))
            if unknown:
                raise TypeError(f"collapse_guard: unknown settings {', '.join(map(repr, unknown))}; "
                                f"it takes {', '.join(known)}")
            return cls(**option)
        raise TypeError(f"collapse_guard must be a bool, a dict of settings or a CollapseGuard, got {option!r}")

    def state_dict(self) -> dict:
        """Counters and the current window, for checkpointing a stream."""
        return {"num_collapses": self.num_collapses, "batches": self._batches,
                "num_fallback_batches": self.num_fallback_batches, "fallback": self.fallback,
                "history": [(a.clone(), c.clone(), n) for a, c, n in self._history]}

    def load_state_dict(self, state: dict) -> None:
        self.num_collapses = int(state["num_collapses"])
        self._batches = int(state["batches"])
        self.num_fallback_batches = int(state.get("num_fallback_batches", 0))
        self.fallback = bool(state.get("fallback", False))
        self._history.clear()
        self._history.extend((a.clone(), c.clone(), int(n)) for a, c, n in state["history"])

    def attach(self, model: nn.Module) -> None:
        """Freeze a copy of the source ``model``, configured with the method's
        test-time normalisation (its BatchNorm layers switch to the source statistics
        for the source view, see :func:`_source_statistics`)."""
        self._reference = copy.deepcopy(model).requires_grad_(False)
        # Test-statistics BatchNorm layers that have source statistics to fall back on.
        self._stat_layers = [m for m in self._reference.modules()
                             if hasattr(m, "tta_alpha") and getattr(m, "running_mean", None) is not None]

    @torch.no_grad()
    def check(self, x: Tensor, logits: Tensor) -> tuple[bool, Tensor | None]:
        """Record one batch. Returns ``(collapsed, fallback)``: whether the model
        has collapsed (the window is then cleared, ready for the reset the caller
        performs), and the source model's logits to report instead of ``logits``
        while the test statistics mislead (else None)."""
        collapsed, fallback = self._check(x, logits)
        self.num_fallback_batches += int(fallback is not None)
        return collapsed, fallback

    def _check(self, x: Tensor, logits: Tensor) -> tuple[bool, Tensor | None]:
        self._batches += 1
        if self._batches % self.check_every:
            return False, self._source(x) if self.fallback else None
        unadapted = self._reference(x).float()
        source = self._source(x) if self._stat_layers else unadapted
        pred, ref_pred, src_pred = logits.argmax(1), unadapted.argmax(1), source.argmax(1)
        counts = torch.bincount(pred, minlength=logits.shape[1])
        sums = torch.stack([
            (pred == ref_pred).sum().float(), *(softmax_entropy(v).mean() for v in (logits, unadapted, source)),
            (ref_pred == src_pred).sum().float(),
        ])
        self._history.append((sums, counts, pred.numel()))
        if len(self._history) < self.window:
            return False, source if self.fallback else None
        window = torch.stack([h[0] for h in self._history]).sum(0)
        total_counts = torch.stack([h[1] for h in self._history]).sum(0)
        total = sum(h[2] for h in self._history)
        agreement, h_adapted, h_unadapted, h_source, stats_agreement, top = (
            torch.cat([window, total_counts.max().float()[None]]).tolist())
        agreement, stats_agreement, top = agreement / total, stats_agreement / total, top / total
        h_adapted, h_unadapted, h_source = (v / len(self._history) for v in (h_adapted, h_unadapted, h_source))
        degenerate = top > self.max_class_fraction or h_adapted < self.entropy_floor * math.log(logits.shape[1])
        if agreement < self.min_agreement and (degenerate or h_adapted <= h_unadapted):
            self.num_collapses += 1
            log.warning(
                "collapse detected (agreement with the unadapted model %.2f, top class %.2f of "
                "predictions, entropy %.3f vs %.3f): resetting to the source weights (%d so far)",
                agreement, top, h_adapted, h_unadapted, self.num_collapses,
            )
            self._history.clear()
            return True, None
        misled = (self.statistics_entropy_ratio is not None and bool(self._stat_layers)
                  and stats_agreement < self.min_agreement
                  and h_unadapted > self.statistics_entropy_ratio * h_source)
        if misled and not self.fallback:
            log.warning(
                "test-time statistics mislead (the unadapted model agrees with the source model on "
                "%.2f, entropy %.3f vs the source's %.3f): reporting the source model's predictions",
                stats_agreement, h_unadapted, h_source,
            )
        self.fallback = misled
        return False, source if misled else None

    def _source(self, x: Tensor) -> Tensor:
        with _source_statistics(self._stat_layers):
            return self._reference(x).float()


@contextmanager
def _source_statistics(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, the reference's test-statistics BatchNorm layers normalise
    with their source (running) statistics, i.e. as the source model did."""
    saved = [m.tta_alpha for m in layers]
    for m in layers:
        m.tta_alpha = 0.0
    try:
        yield
    finally:
        for m, alpha in zip(layers, saved):
            m.tta_alpha = alpha
