"""``vte``: Vision-Text Ensemble (Döbler, Marsden and Yang, "A Lost Opportunity for
Vision-Language Models: A Comparative Study of Online Test-Time Adaptation for
Vision-Language Models", CVPR 2024 workshops).

The training-free baseline of TPT: each test image is seen through TPT's views (the
image and random resized crops), the views whose predictions have the lowest entropy
are kept, and their L2-normalised image features are averaged (the vision ensemble).
That mean feature is classified against the class text features of a prompt-template
ensemble (the text ensemble) with the model's logit scale. Nothing adapts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..augment.views import gather_views
from .clip_views import CLIPViewsMethod
from .records import StepRecord
from .registry import register_method

__all__ = ["VTE", "vision_ensemble"]


def vision_ensemble(features: Tensor, index: Tensor) -> Tensor:
    """The mean (B, dim) of the image features ``features`` (B, N, dim) of the views
    ``index`` (B, k) of each image. As the reference code, the mean of normalised
    features is not normalised again (predictions are the same either way; the
    logits of a less coherent set of views are smaller)."""
    return gather_views(features, index).mean(dim=1)


@register_method("vte")
class VTE(CLIPViewsMethod):
    """VTE on a CLIP classifier (``tta.load_model("clip:...")``); no parameter, statistic
    or state changes. Per image: ``num_views`` views (view 0 the image itself, the
    others random resized crops with flips, AugMixed with ``augmix``), the
    ``selection_p`` fraction with the lowest prediction entropy kept
    (``max(1, int(num_views * selection_p))``: 6 of 64), their normalised image
    features averaged, and ``logit_scale * mean @ text_features.T`` returned.

    Defaults are those of the reference code (mariodoebler/test-time-adaptation,
    ``classification/methods/vte.py``): 64 views (``cfgs/imagenet_c/vte.yaml``,
    ``TEST.N_AUGMENTATIONS``), the 10% most confident (``conf.py``,
    ``TPT.SELECTION_P``), AugMix only for the fine-grained data sets (its
    ``datasets/data_loading.py``), so not for CIFAR-10-C or ImageNet-C. The
    published runs have no CIFAR-10 VTE config: both presets are those settings.

    The text side is the classifier's own text features. The reference code runs
    VTE with a prompt ensemble (``CLIP.PROMPT_MODE: ensemble``: the normalised mean
    of the text features over the CLIP paper's templates of the data set, its 80
    ImageNet ones for ImageNet, its 18 CIFAR-10 ones for CIFAR-10); load the
    classifier so, e.g. ``tta.load_model("clip:ViT-B-16/openai",
    templates="clip80")`` (``templates="cifar10"`` for CIFAR-10). A classifier with a learned prompt (``ctx``) is used
    with that prompt.

    The views of a batch are drawn, encoded (in chunks of
    :data:`~tta.methods.clip_views.VIEW_CHUNK` views) and averaged in one go, with
    no loop over the images.

    Args:
        num_views: views per test image, the image itself included.
        selection_p: fraction of the views kept, the most confident.
        augmix: AugMix the crops.
        transform: the crop of each view but the first, a module on (N, 3, H, W)
            batches of one's own (default: random resized crops and flips).
    """

    has_optimizer = False
    adapts_prompt = False  # the model's text features as they are
    presets = {"cifar10": {}, "imagenet": {}}

    @classmethod
    def unused_options(cls) -> dict[str, str]:
        return {**super().unused_options(),
                "ctx_init": "learns no prompt (it classifies with the model's own text features)"}

    def __init__(
        self,
        model: nn.Module,
        *,
        num_views: int = 64,
        selection_p: float = 0.1,
        augmix: bool = False,
        transform: nn.Module | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model, num_views=num_views, selection_p=selection_p, augmix=augmix,
                         transform=transform, **kwargs)

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        return []

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        features, index, _ = self.select_views(x)
        logits = self.model.logits(vision_ensemble(features, index))
        return logits, StepRecord(x.shape[0], index.numel())
