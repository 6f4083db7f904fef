"""Mid-stream checkpoints of a run (``checkpoint.pt`` in its output folder):
everything a resumed run needs to end with the numbers of an uninterrupted one."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..methods.records import StepRecord
from ..paths import atomic_write_bytes
from .config import config_changes
from .results import code_changes, code_provenance

__all__ = ["CHECKPOINT", "Progress", "record_dicts", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger("tta.bench")

#: The checkpoint's file name, in the run's output folder.
CHECKPOINT = "checkpoint.pt"


@dataclass
class Progress:
    """What a run has measured so far: ``position`` batches done, per image whether
    it was right and the confidence, per step the method's record (a
    :class:`~tta.methods.records.StepRecord`, or its dict once checkpointed) and
    the seconds of the method call."""

    position: int = 0
    correct: list[Tensor] = field(default_factory=list)
    confidence: list[Tensor] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    def consolidate(self) -> None:
        """One tensor per list and records as plain dicts: the form a checkpoint
        stores (and cheap to append to again)."""
        self.correct, self.confidence = [torch.cat(self.correct)], [torch.cat(self.confidence)]
        self.records = record_dicts(self.records)


def record_dicts(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Step records as plain dicts (a checkpoint stores them so; methods that do not
    step leave ``None``)."""
    return [r.to_dict() if isinstance(r, StepRecord) else (r or {}) for r in records]


def save_checkpoint(path: Path, config_hash: str, progress: Progress, method: nn.Module,
                    device: torch.device, config: Mapping[str, Any] | None = None) -> None:
    """Write ``progress``, the method's state and the RNG state atomically (a kill
    during the write leaves the previous checkpoint). ``config``, the plain config
    the hash is of, is kept to name what changed when a later run cannot resume."""
    progress.consolidate()
    state = {
        "config_hash": config_hash,
        "config": dict(config) if config is not None else None,
        **code_provenance(),
        "position": progress.position,
        "method": method.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "correct": progress.correct[0].cpu(),
        "confidence": progress.confidence[0].cpu(),
        "records": progress.records,
        "step_s": list(progress.step_s),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, config_hash: str, method: nn.Module, device: torch.device,
                    config: Mapping[str, Any] | None = None) -> Progress | None:
    """The progress of the checkpoint at ``path``, with the method's state and the
    RNG state restored from it; None (start over) when there is none, it cannot be
    read or it belongs to another config (the warning names the keys that differ
    from ``config``, the plain config of this run)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means: start over
        log.warning("ignoring unreadable checkpoint %s (%s): starting the stream from the beginning", path, err)
        return None
    if state.get("config_hash") != config_hash:
        saved = state.get("config")
        changed = (config_changes(saved, config) if isinstance(saved, Mapping) and config is not None
                   else "its config was not saved with it")
        log.warning("ignoring %s: it belongs to a different config (%s); starting from the beginning",
                    path, changed)
        return None
    changed = code_changes(state)
    if changed:
        log.warning("resuming from %s, written by other code (%s): the batches before and after it may not "
                    "agree; delete it to start the stream again", path, changed)
    method.load_state_dict(state["method"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return Progress(int(state["position"]), [state["correct"].to(device)], [state["confidence"].to(device)],
                    list(state["records"]), list(state["step_s"]))
