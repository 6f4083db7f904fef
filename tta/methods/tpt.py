"""``tpt``: Test-time Prompt Tuning (Shu et al., "Test-Time Prompt Tuning for
Zero-Shot Generalization in Vision-Language Models", NeurIPS 2022).

For each test image, TPT tunes the learnable context of a CLIP prompt so that the
predictions on confident augmented views of the image agree: it minimises the entropy
of their average prediction, then classifies the image with the tuned prompt. Every
image starts again from the initial prompt.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..augment.views import gather_views
from .clip_views import CLIPViewsMethod
from .entropy import marginal_entropy
from .records import StepRecord
from .registry import register_method


@register_method("tpt")
class TPT(CLIPViewsMethod):
    """TPT on a CLIP classifier (``tta.load_model("clip:...")``). Defaults are the
    paper's and its code's: 64 views (the image and 63 random resized crops), the 10%
    most confident kept, 1 step of AdamW with lr 5e-3 (and PyTorch's AdamW weight
    decay, 0.01, which the reference code leaves at its default) on the 4 context
    vectors of "a photo of a".

    The image encoder is frozen, so each view's image features are computed once and
    only the text side runs per step.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: str = "adamw",
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        **kwargs,
    ) -> None:
        super().__init__(model, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        features, index, _ = self.select_views(x)
        selected = gather_views(features, index)  # (B, k, dim)
        logits, loss = self.adapt_each_image(
            x.shape[0],
            loss=lambda i: marginal_entropy(self.model.logits(selected[i])),
            predict=lambda i: self.model.logits(features[i, :1]),  # view 0: the image itself
        )
        return logits, StepRecord(x.shape[0], index.numel(), loss)
