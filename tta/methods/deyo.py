"""``deyo``: Destroy Your Object (Lee et al., "Entropy is not Enough for Test-Time
Adaptation", ICLR 2024).

Entropy alone cannot tell a confident prediction made from object shape from one
made from spurious texture. DeYO destroys the object (shuffles patches) and measures
how much the predicted class loses: the Pseudo-Label Probability Difference
``PLPD = p(y|x) - p(y|x')``. It adapts on samples that are confident (low entropy)
*and* shape-driven (high PLPD), weighting each by both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..augment.destroy import make_destroy_transform
from .base import TTAMethod
from .entropy import check_weight_margin, softmax_entropy
from .norm_layers import sample_weighted_batch_stats
from .params import sar_paper_lr
from .records import DeYORecord, StepRecord
from .registry import register_method


def plpd(probs: Tensor, probs_destroyed: Tensor) -> Tensor:
    """Pseudo-Label Probability Difference: the drop in probability of the pseudo
    label ``argmax probs`` once the object is destroyed."""
    pseudo = probs.argmax(dim=1, keepdim=True)
    return (probs.gather(1, pseudo) - probs_destroyed.gather(1, pseudo)).squeeze(1)


def deyo_weights(
    entropy: Tensor, plpd_value: Tensor, margin_e0: float, reweight_ent: float, reweight_plpd: float
) -> Tensor:
    """Sample weights ``reweight_ent * exp(-(entropy - margin_e0)) + reweight_plpd *
    exp(PLPD)``; both switched off leaves plain entropy (weight 1)."""
    if reweight_ent == 0 and reweight_plpd == 0:
        return torch.ones_like(entropy)
    return reweight_ent * torch.exp(margin_e0 - entropy) + reweight_plpd * torch.exp(plpd_value)


@register_method("deyo")
class DeYO(TTAMethod):
    """DeYO. Defaults are the paper's (SGD, momentum 0.9, ``lr="paper"``: the
    official rule shared with SAR, :func:`~tta.methods.params.sar_paper_lr`, 2.5e-4
    for a ResNet at batch 64, 1e-3 for a ViT at batch 64; the official code's frozen
    modules, ``skip_modules="paper"``; the entropy margins of
    :attr:`margin_fractions` (``deyo_margin = 0.5 ln C``, ``margin_e0 = 0.4 ln C``),
    ``plpd_threshold = 0.2`` (0.3 in the paper's mild setting), patch shuffle on a
    4x4 grid).

    Args:
        deyo_margin: entropy filter: keep samples with entropy below it.
        margin_e0: entropy offset of the entropy weight.
        plpd_threshold: PLPD filter: keep samples with PLPD above it.
        aug_type: the object-destroying transform: ``"patch"``, ``"pixel"``, ``"occ"``.
        patch_len: grid side of ``"patch"``.
        occlusion_size: side of the square of ``"occ"``: a fraction of the image
            side, or pixels.
        occlusion_top: top row of that square (None: centred).
        occlusion_left: left column of that square (None: centred).
        reweight_ent: weight of the entropy term of the sample weights (0: off).
        reweight_plpd: weight of the PLPD term of the sample weights (0: off).
        destroy: a module of one's own that destroys the objects of a (B, 3, H, W)
            batch (e.g. ``kornia.augmentation.RandomJigsaw((4, 4), p=1.0)``); it
            replaces ``aug_type`` and its options.

    Presets: ``"imagenet"`` is these defaults; ``"cifar10"`` the CIFAR-10-C setting
    of mariodoebler/test-time-adaptation (cfgs/cifar10_c/deyo.yaml): Adam, lr 1e-3.
    """

    presets = {"cifar10": {"optimizer": "adam", "lr": 1e-3}, "imagenet": {}}
    margin_fractions = {"deyo_margin": 0.5, "margin_e0": 0.4}
    record_type = DeYORecord

    def __init__(
        self,
        model: nn.Module,
        *,
        deyo_margin: float | None = None,
        margin_e0: float | None = None,
        plpd_threshold: float = 0.2,
        aug_type: str = "patch",
        patch_len: int = 4,
        occlusion_size: float | int = 0.5,
        occlusion_top: int | None = None,
        occlusion_left: int | None = None,
        reweight_ent: float = 1.0,
        reweight_plpd: float = 1.0,
        destroy: nn.Module | None = None,
        skip_modules: str | list[str] = "paper",
        lr: float | str = "paper",
        **kwargs,
    ) -> None:
        check_weight_margin("margin_e0", margin_e0)
        super().__init__(model, skip_modules=skip_modules, lr=lr, **kwargs)
        self.deyo_margin, self.margin_e0 = deyo_margin, margin_e0
        self.plpd_threshold = plpd_threshold
        self.reweight_ent, self.reweight_plpd = reweight_ent, reweight_plpd
        self.destroy = destroy if destroy is not None else make_destroy_transform(
            aug_type, patch_len, occlusion_size, occlusion_top, occlusion_left
        )

    def paper_lr(self, batch_size: int) -> float:
        return sar_paper_lr(self.model, batch_size)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        entropy = softmax_entropy(logits)
        num_classes = logits.shape[1]
        confident = entropy < self.margin("deyo_margin", num_classes)

        with torch.no_grad():
            # The destroyed view is scored as a batch of the confident samples alone
            # (BatchNorm statistics over them only), as the paper's subset forward.
            with sample_weighted_batch_stats(self.model, confident):
                probs_destroyed = self.model(self.destroy(x)).softmax(1)
            plpd_value = plpd(logits.detach().softmax(1), probs_destroyed)
        selected = confident & (plpd_value > self.plpd_threshold)

        margin_e0 = self.margin("margin_e0", num_classes)
        weight = deyo_weights(entropy.detach(), plpd_value, margin_e0, self.reweight_ent, self.reweight_plpd)
        count = selected.sum()
        loss = (entropy * weight * selected).sum() / count.clamp_min(1)
        self.backward(loss)
        self.step(enabled=count > 0)
        return logits.detach(), DeYORecord(x.shape[0], count, loss.detach(), num_confident=confident.sum())
