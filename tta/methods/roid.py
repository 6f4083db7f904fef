"""``roid``: universal test-time adaptation through weight ensembling, diversity
weighting and prior correction (Marsden, Döbler, Yang, WACV 2024).

The norm layers' affine parameters adapt, with test-batch statistics, by a
soft-likelihood-ratio loss weighted per image by how certain the prediction is and
how much it differs from the recent mean prediction (the least diverse images are
left out), plus a consistency loss between each kept image and an augmented view.
After each step the adapted weights are pulled toward the source (weight
ensembling), which keeps the model from drifting; the reported logits are the
step's own, reweighted by a smoothed estimate of the batch's class prior.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment.kornia_views import check_transform, cotta_augmentation
from .base import TTAMethod
from .entropy import soft_likelihood_ratio, softmax_entropy, symmetric_cross_entropy
from .norm_layers import uses_test_statistics_alone
from .records import StepRecord
from .registry import register_method
from .teacher import pull_toward_


def _min_max(v: Tensor) -> Tensor:
    # A batch whose values are all equal (one image) maps to 0, not NaN.
    return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)


def certainty_diversity_weights(logits: Tensor, mean_probs: Tensor, temperature: float) -> Tensor:
    """ROID's weight of each image: ``exp(diversity * certainty / temperature)``,
    both min-max normalised over the batch (diversity: 1 - cosine similarity of the
    prediction to ``mean_probs``; certainty: negative entropy), and 0 for the images
    whose diversity is below the batch's mean (they add nothing new)."""
    probs = logits.softmax(1)
    diversity = _min_max(1 - F.cosine_similarity(mean_probs.expand_as(probs), probs, dim=1))
    certainty = _min_max(-softmax_entropy(logits))
    weight = torch.exp(diversity * certainty / temperature)
    return torch.where(diversity < diversity.mean(), torch.zeros_like(weight), weight)


def prior_corrected(logits: Tensor) -> Tensor:
    """The logits times a smoothed class prior of the batch (ROID's prior
    correction): ``(pi + s) / (1 + s C)`` with ``pi`` the mean prediction and
    ``s = max(1/B, 1/C) / max(pi)``, so a uniform prior changes nothing and rare
    classes of a label-shifted batch lose. The official code multiplies the logits,
    not the probabilities; so does this."""
    batch, classes = logits.shape
    prior = logits.float().softmax(1).mean(0)
    smoothing = max(1 / batch, 1 / classes) / prior.max()
    return logits * ((prior + smoothing) / (1 + smoothing * classes)).to(logits.dtype)


@register_method("roid")
class ROID(TTAMethod):
    """ROID. Defaults are the official code's CIFAR-10-C setting (Adam, lr 1e-3,
    batch 200; mariodoebler/test-time-adaptation conf.py, whose ROID values every
    data set shares).

    Args:
        source_momentum: weight ensembling, ``theta <- m theta + (1 - m) theta_src``
            after each step (1 turns it off).
        probs_momentum: momentum of the running mean prediction the diversity is
            measured against.
        temperature: of the certainty-diversity weight (1/3).
        weighting: certainty and diversity weighting (off: every image weighs 1,
            none is left out).
        consistency: the consistency loss on an augmented view of the kept images
            (left out for a batch that keeps one image only, on BatchNorm layers
            that normalise by the batch's statistics alone).
        prior_correction: reweight the reported logits by the batch's class prior.
        transform: the view augmentation (default: CoTTA's transform without blur
            and noise, mirrored at the border, as the official code).

    Presets: ``"cifar10"`` is these defaults; ``"imagenet"`` the ImageNet-C setting:
    SGD (momentum 0.9, Nesterov) lr 2.5e-4, batch 64.
    """

    presets = {"cifar10": {}, "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True}}

    def __init__(
        self,
        model: nn.Module,
        *,
        source_momentum: float = 0.99,
        probs_momentum: float = 0.9,
        temperature: float = 1 / 3,
        weighting: bool = True,
        consistency: bool = True,
        prior_correction: bool = True,
        transform: nn.Module | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        **kwargs,
    ) -> None:
        check_transform(transform)
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.source_momentum, self.probs_momentum, self.temperature = source_momentum, probs_momentum, temperature
        self.weighting, self.consistency, self.prior_correction = weighting, consistency, prior_correction
        self.transform = transform if transform is not None else cotta_augmentation(
            blur_and_noise=False, padding_mode="reflection")
        # Running mean prediction; NaN until the first batch sets it to uniform.
        self.register_buffer("mean_probs", torch.tensor(float("nan")))
        # The official loss divides by the configured batch size, not the batch's: a
        # domain's short last batch (ImageNet-C's 5000 = 78 x 64 + 8) takes a smaller
        # step. Here the largest batch since the last reset stands for it.
        self.register_buffer("largest_batch", torch.zeros((), dtype=torch.long,
                                                          device=next(model.parameters()).device))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        # A state saved before ``largest_batch`` existed (a tta-bench checkpoint of a run
        # in progress) was refused as "from another model or method": it counts from the
        # next batch instead, as after a reset.
        if isinstance(state_dict, Mapping) and "mean_probs" in state_dict and "largest_batch" not in state_dict:
            state_dict = {**state_dict, "largest_batch": torch.zeros((), dtype=torch.long)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def roid_loss(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The weighted soft-likelihood-ratio and consistency loss of a batch, and
        the number of images kept."""
        batch = x.shape[0]
        self.largest_batch.clamp_(min=batch)
        if self.mean_probs.dim() == 0:
            self.mean_probs = torch.full((logits.shape[1],), 1 / logits.shape[1], device=logits.device)
        with torch.no_grad():
            probs = logits.float().softmax(1)
            weight = (certainty_diversity_weights(logits.float(), self.mean_probs, self.temperature)
                      if self.weighting else torch.ones(batch, device=x.device))
            self.mean_probs = self.probs_momentum * self.mean_probs + (1 - self.probs_momentum) * probs.mean(0)
        loss = (weight * soft_likelihood_ratio(logits)).sum() / self.largest_batch
        kept = weight > 0
        if self.consistency:
            # One host sync: the view's forward and backward run on the kept images
            # only (about half the batch), with their own statistics as in the
            # official code; a sync-free full-batch pass would cost the other half.
            keep = kept.nonzero().squeeze(1)
            # A single kept image would be normalised by its own BatchNorm statistics
            # (which BatchNorm over tokens or 1x1 maps refuses, failing the official
            # code): its view is left out, as are none (an empty sum adds 0).
            if len(keep) > 1 or (len(keep) == 1 and not uses_test_statistics_alone(self.model)):
                view_logits = self.model(self.transform(x[keep]))
                loss = loss + (weight[keep] * symmetric_cross_entropy(view_logits, logits[keep])).sum() / self.largest_batch
        return loss, kept.sum()

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        loss, num_kept = self.roid_loss(x, logits)
        self.backward(loss)
        self.step()
        self.after_step()
        logits = logits.detach()
        reported = prior_corrected(logits) if self.prior_correction else logits
        return reported, StepRecord(num_samples=x.shape[0], num_selected=num_kept, loss=loss.detach())

    def after_step(self) -> None:
        """Weight ensembling with the source."""
        pull_toward_([p for _, p in self.adapted], self.source_params(), self.source_momentum)
