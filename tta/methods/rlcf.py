"""``rlcf``: Reinforcement Learning with CLIP Feedback (Zhao et al., "Test-Time
Adaptation with CLIP Reward for Zero-Shot Generalization in Vision-Language Models",
ICLR 2024).

Entropy minimisation lets a model reinforce its own mistakes. RLCF instead asks a
second, frozen CLIP model for feedback: for each confident view of a test image it
takes K candidate classes from the policy, rewards each with the reward model's
CLIPScore ``2.5 * max(cos(image, "a photo of a <class>."), 0)``, subtracts the mean
reward of the K candidates as baseline, and follows the policy gradient
(REINFORCE): ``loss = -(reward - baseline) * log p(class)``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..augment.views import gather_views
from .clip_views import CLIPViewsMethod, check_clip_classifier, clip_adapted_params
from .records import StepRecord
from .registry import register_method

CLIPSCORE_WEIGHT = 2.5
_PAPER_LR = {"prompt": 7e-3, "image": 1e-5, "image_norm": 1e-5}


def clip_reward(image_features: Tensor, text_features: Tensor, classes: Tensor) -> Tensor:
    """CLIPScore rewards ``2.5 * max(cos, 0)`` of each view (k, dim) with the text
    of each of its candidate classes (k, K); features L2-normalised."""
    cos = (image_features.unsqueeze(1) * text_features[classes]).sum(dim=-1)
    return CLIPSCORE_WEIGHT * cos.clamp_min(0)


def reinforce_loss(logits: Tensor, classes: Tensor, reward: Tensor) -> tuple[Tensor, Tensor]:
    """REINFORCE with the mean reward of each view's candidates as baseline: returns
    ``mean(-(reward - baseline) * log p(class))`` over views and candidates, and the
    advantages ``reward - baseline`` (k, K)."""
    advantage = reward - reward.mean(dim=1, keepdim=True)
    log_p = logits.float().log_softmax(dim=-1).gather(1, classes)
    return -(advantage * log_p).mean(), advantage


def candidate_classes(logits: Tensor, k: int, sampling: str) -> Tensor:
    """K classes per row of ``logits``: the top K (``"topk"``), or K draws without
    replacement from ``softmax(logits)`` (``"sample"``, Gumbel top-k, on the device)."""
    if sampling == "sample":
        u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
        logits = logits.float().log_softmax(dim=-1) - (-u.log()).log()
    return logits.topk(k, dim=-1).indices


@register_method("rlcf")
class RLCF(CLIPViewsMethod):
    """RLCF on a CLIP classifier. Defaults are the paper's classification setting as
    in its reference code: 64 views, the 10% most confident kept (selected once,
    before the first step), K = 3 candidates per view, 3 steps of AdamW (weight decay
    5e-4) with lr 7e-3 on the prompt context ("a photo of a") or 1e-5 on the image
    encoder, reward model CLIP ViT-L/14. The reference code takes the policy's top-K
    classes as the candidates (``sampling="topk"``); ``"sample"`` draws them.

    The reward model scores the selected views themselves (its image features are
    computed once per test image, before the steps, from its own preprocessing of the
    views), against the text "a photo of a <class>." (its own text features, cached,
    when a loaded classifier is given).

    Args:
        reward: the reward model: a ``"clip:<model>/<pretrained>"`` name, loaded with
            the policy's class names and "a photo of a {}.", or a loaded CLIP
            classifier over the same classes; ``None`` uses a frozen copy of the policy.
        adapt: what adapts: ``"prompt"`` (the context vectors), ``"image"`` (every
            image-encoder weight) or ``"image_norm"`` (the image encoder's norm layers).
        lr: learning rate; None is the paper's for ``adapt``: 7e-3 for the prompt,
            1e-5 for the image encoder (also used for ``"image_norm"``, the reference
            code's ``--tune_norm`` option, for which no value is published).
        sample_k: candidate classes per view (K).
        sampling: how the candidates are chosen: ``"topk"`` or ``"sample"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reward: str | nn.Module | None = "clip:ViT-L-14/openai",
        adapt: str = "prompt",
        sample_k: int = 3,
        sampling: str = "topk",
        steps: int = 3,
        optimizer: str = "adamw",
        lr: float | None = None,
        weight_decay: float = 5e-4,
        **kwargs,
    ) -> None:
        if adapt not in _PAPER_LR:
            raise ValueError(f"adapt must be one of {sorted(_PAPER_LR)}, got {adapt!r}")
        if sampling not in ("topk", "sample"):
            raise ValueError(f"sampling must be 'topk' or 'sample', got {sampling!r}")
        check_clip_classifier(model, "rlcf")
        if not isinstance(sample_k, int) or not 1 <= sample_k <= model.num_classes:
            raise ValueError(f"sample_k must be an integer in [1, {model.num_classes}], got {sample_k!r}")
        self.adapt, self.sample_k, self.sampling = adapt, sample_k, sampling
        self.adapts_prompt = adapt == "prompt"
        lr = _PAPER_LR[adapt] if lr is None else lr
        super().__init__(model, steps=steps, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.reward_model = self._reward_model(reward, model)

    @staticmethod
    def _reward_model(reward: str | nn.Module | None, policy: nn.Module) -> nn.Module:
        if reward is None:
            reward = copy.deepcopy(policy)
        elif isinstance(reward, str):
            from ..models import load_model  # the public loader: a name is a model to load

            reward = load_model(reward, classnames=policy.classnames, templates=["a photo of a {}."])
        elif reward is policy:
            raise ValueError("the reward model must not be the policy itself: pass a copy (or reward=None)")
        check_clip_classifier(reward, "rlcf's reward")
        if list(reward.classnames) != list(policy.classnames):
            raise ValueError("the reward model must classify over the policy's class names, in order")
        device = policy.logit_scale.device
        return reward.to(device).eval().requires_grad_(False)

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        return clip_adapted_params(self.model, self.adapt, "rlcf")

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        features, index, pixels = self.select_views(x)
        selected = gather_views(features, index)  # (B, k, dim)
        with torch.no_grad():  # the reward model sees the selected views, once
            reward_images = self.reward_model.encode_image(pixels.flatten(0, 1)).view(*index.shape, -1)
            reward_texts = self.reward_model.text_features()

        def loss(i: int) -> Tensor:
            # A frozen image encoder (prompt tuning): reuse the views' features.
            view_logits = self.model.logits(selected[i]) if self.adapts_prompt else self.model(pixels[i])
            classes = candidate_classes(view_logits.detach(), self.sample_k, self.sampling)
            return reinforce_loss(view_logits, classes, clip_reward(reward_images[i], reward_texts, classes))[0]

        def predict(i: int) -> Tensor:
            return self.model.logits(features[i, :1]) if self.adapts_prompt else self.model(x[i: i + 1])

        logits, mean_loss = self.adapt_each_image(x.shape[0], loss, predict)
        return logits, StepRecord(x.shape[0], index.numel(), mean_loss)
