"""Collapse guard: reset an adapting model that has collapsed.

Entropy minimisation has a trivial optimum: predict one class with certainty. On
long, label-sorted or very hard streams gradient methods can slide into it and stay
there. The guard compares the adapted model with a frozen copy of the source model
(same test-time normalisation, no parameter updates) over a window of batches; when
their predictions stop agreeing *and* the adapted model's predictions degenerate (one
class dominates, or the entropy falls to about zero), it resets the method to the
source state, as SAR's recovery and RDumb's resets do, and counts the event.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger("tta")

__all__ = ["CollapseGuard"]


@dataclass
class CollapseGuard:
    """Settings of the collapse guard (``collapse_guard=True`` uses the defaults, a
    dict overrides them).

    Args:
        window: batches over which agreement and class spread are measured.
        min_agreement: below this fraction of predictions shared with the source
            model, the adapted model is suspect.
        max_class_fraction: a suspect model whose most frequent class exceeds this
            fraction of the window's predictions has collapsed...
        entropy_floor: ...as has one whose mean entropy falls below this fraction
            of ``ln C``.
        check_every: compare with the source model every this many batches (each
            check costs one extra no-grad forward and one host sync).
    """

    window: int = 5
    min_agreement: float = 0.5
    max_class_fraction: float = 0.3
    entropy_floor: float = 0.02
    check_every: int = 1

    def __post_init__(self) -> None:
        if self.window < 1 or self.check_every < 1:
            raise ValueError("collapse_guard window and check_every must be >= 1")
        self.num_collapses = 0
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
            return cls(**option)
        raise TypeError(f"collapse_guard must be a bool, a dict of settings or a CollapseGuard, got {option!r}")

    def state_dict(self) -> dict:
        """Counters and the current window, for checkpointing a stream."""
        return {"num_collapses": self.num_collapses, "batches": self._batches,
                "history": [(a.clone(), c.clone(), n) for a, c, n in self._history]}

    def load_state_dict(self, state: dict) -> None:
        self.num_collapses = int(state["num_collapses"])
        self._batches = int(state["batches"])
        self._history.clear()
        self._history.extend((a.clone(), c.clone(), int(n)) for a, c, n in state["history"])

    def attach(self, model: nn.Module) -> None:
        """Freeze a copy of the source ``model`` as the reference."""
        self._reference = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def check(self, x: Tensor, logits: Tensor) -> bool:
        """Record one batch; True when the model has collapsed (and the window is
        cleared, ready for the reset the caller performs)."""
        self._batches += 1
        if self._batches % self.check_every:
            return False
        reference = self._reference(x).argmax(1)
        pred = logits.argmax(1)
        log_p = logits.float().log_softmax(1)
        entropy = -(log_p.exp() * log_p).sum(1).mean()
        counts = torch.bincount(pred, minlength=logits.shape[1])
        self._history.append(
            (torch.stack([(pred == reference).sum().float(), entropy]), counts, pred.numel())
        )
        if len(self._history) < self.window:
            return False
        agree_entropy = torch.stack([h[0] for h in self._history]).sum(0)
        counts = torch.stack([h[1] for h in self._history]).sum(0)
        total = sum(h[2] for h in self._history)
        agreement, entropy_sum, top = torch.cat([agree_entropy, counts.max().float()[None]]).tolist()
        agreement /= total
        degenerate = (top / total > self.max_class_fraction) or (
            entropy_sum / len(self._history) < self.entropy_floor * math.log(logits.shape[1])
        )
        if agreement < self.min_agreement and degenerate:
            self.num_collapses += 1
            log.warning(
                "collapse detected (agreement with source %.2f, top class %.2f of predictions): "
                "resetting to the source weights (%d so far)",
                agreement, top / total, self.num_collapses,
            )
            self._history.clear()
            return True
        return False
