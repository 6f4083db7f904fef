"""What one adaptation step did: :class:`StepRecord` and the record types of the
methods that report more, with declared fields, so a summary knows its columns
before the first step (a method names its type in ``record_type``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

__all__ = ["StepRecord", "EATARecord", "SARRecord", "DeYORecord", "CoTTARecord", "RMTRecord", "SANTARecord",
           "RoTTARecord", "AdaContrastRecord", "LAMERecord", "FOARecord", "TTRVRecord"]

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


@dataclass
class EATARecord(StepRecord):
    """An EATA/ETA step: ``num_reliable`` images passed the entropy filter
    (``num_selected``: the redundancy filter too)."""

    num_reliable: Value = None


@dataclass
class SARRecord(EATARecord):
    """A SAR step: ``num_reliable`` images passed the first entropy filter
    (``num_selected``: both); ``ema`` is the moving average of the post-perturbation
    entropy, ``num_resets`` the model recoveries so far."""

    ema: Value = None
    num_resets: Value = None


@dataclass
class DeYORecord(StepRecord):
    """A DeYO step: ``num_confident`` images passed the entropy filter
    (``num_selected``: the PLPD filter too)."""

    num_confident: Value = None


@dataclass
class CoTTARecord(StepRecord):
    """A CoTTA step: ``averaged`` tells whether the teacher averaged its augmented
    views (the source model's mean confidence was below the threshold)."""

    averaged: Value = None


@dataclass
class RMTRecord(StepRecord):
    """An RMT step: its three losses before weighting (``source_loss`` is ``None``
    when source replay is off)."""

    self_training_loss: Value = None
    contrastive_loss: Value = None
    source_loss: Value = None


@dataclass
class SANTARecord(StepRecord):
    """A SANTA step: its two losses before weighting."""

    anchor_loss: Value = None
    contrastive_loss: Value = None


@dataclass
class RoTTARecord(StepRecord):
    """A RoTTA step. ``num_selected``: images of the batch the memory took in;
    ``num_updates``: updates the batch triggered (0 to several); ``memory_occupancy``:
    images stored after it; ``loss``: the mean of its updates' losses (or ``None``)."""

    num_updates: Value = None
    memory_occupancy: Value = None


@dataclass
class AdaContrastRecord(StepRecord):
    """An AdaContrast step: ``refined`` tells whether the pseudo-labels came from the
    neighbours' soft voting (False in the warm-up: plain argmax); ``ce_loss``,
    ``contrastive_loss``, ``diversity_loss`` are the three terms of ``loss``."""

    refined: Value = None
    ce_loss: Value = None
    contrastive_loss: Value = None
    diversity_loss: Value = None


@dataclass
class LAMERecord(StepRecord):
    """A LAME step: ``iterations`` bound updates were made before the energy
    stopped changing (at most ``max_steps``); ``num_changed`` images got another
    class than the source model gives them."""

    iterations: Value = None
    num_changed: Value = None


@dataclass
class FOARecord(StepRecord):
    """A FOA step (``loss``: the fitness of the candidate that predicted):
    ``entropy`` and ``discrepancy`` are its two terms before weighting (the
    batch-summed prediction entropy; the squared distance of the test-batch CLS
    statistics of every layer from the source's); ``kept_best`` tells whether the
    previous batch's best prompt won again."""

    entropy: Value = None
    discrepancy: Value = None
    kept_best: Value = None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


@dataclass
class TTRVRecord(StepRecord):
    """A TTRV step (its last sampling round; per-image episodes: their mean, and
    ``num_unanimous`` their sum): ``mean_reward`` is the mean reward of the trained
    draws, ``vote_entropy`` the mean normalised entropy of the votes (0: unanimous),
    ``num_unanimous`` the images whose draws all agree (their advantages are 0),
    ``kl`` the KL of the policy to the source model (``None`` when ``kl_weight`` is
    0), ``clip_fraction`` the share of draws whose PPO ratio was clipped."""

    mean_reward: Value = None
    vote_entropy: Value = None
    num_unanimous: Value = None
    kl: Value = None
    clip_fraction: Value = None
