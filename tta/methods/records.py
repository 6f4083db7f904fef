"""What one adaptation step did: :class:`StepRecord`, with declared fields, so a
summary knows its columns before the first step (methods that record more declare a
subclass next to the method)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

__all__ = ["StepRecord"]

#: A count or value a step produced: a 0-dim tensor on the device (read, and so
#: synced, only by :meth:`StepRecord.to_dict`), or a plain number.
Value = Tensor | int | float | bool | None


@dataclass
class StepRecord:
    """One adaptation step. Tensor fields stay on the device until read through
    :meth:`to_dict`, so recording costs no sync. Methods that record more declare a
    subclass with the extra fields and name it in their ``record_type``.

    Attributes:
        num_samples: images in the batch.
        num_selected: images the loss used (after the method's filters).
        loss: the loss of the step.
        num_collapses: resets the collapse guard has made so far (0 without a guard).
        guard_fallback: whether the guard reported the source model's predictions.
    """

    num_samples: int
    num_selected: Value = None
    loss: Value = None
    num_collapses: int = 0
    guard_fallback: bool = False

    @classmethod
    def columns(cls) -> list[str]:
        """The field names, in order: the columns of a per-step summary."""
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (tensors read to the host)."""
        return {name: _plain(getattr(self, name)) for name in self.columns()}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value
