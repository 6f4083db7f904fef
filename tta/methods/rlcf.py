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

from .._checks import check_positive_int
from ..augment.views import gather_views
from .clip_views import CLIPViewsMethod, check_clip_classifier, clip_adapted_params
from .records import StepRecord
from .registry import register_method
from .teacher import ema_update_

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


class MomentumStart(nn.Module):
    """RLCF's momentum buffer (the reference code's ``--momentum_update``): an
    exponential moving average of the adapted parameters as each test image leaves
    them, and the start that every test image is adapted from, refreshed from the
    average every ``every`` images. All in buffers, so ``state_dict()`` keeps it and
    a step that raises leaves it as it was. Buffer ``average_<i>``/``start_<i>``
    belong to the method's ``i``-th adapted parameter; ``count`` counts the images
    since the last refresh."""

    def __init__(self, params: list[Tensor]) -> None:
        super().__init__()
        self.size = len(params)
        for i, p in enumerate(params):
            self.register_buffer(f"average_{i}", p.detach().clone())
            self.register_buffer(f"start_{i}", p.detach().clone())
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=params[0].device))

    def averages(self) -> list[Tensor]:
        return [getattr(self, f"average_{i}") for i in range(self.size)]

    def starts(self) -> list[Tensor]:
        return [getattr(self, f"start_{i}") for i in range(self.size)]

    @torch.no_grad()
    def restart_from(self, source: list[Tensor]) -> None:
        """Average and start back to ``source``, the count to zero (bit-exact)."""
        for average, start, value in zip(self.averages(), self.starts(), source):
            average.copy_(value)
            start.copy_(value)
        self.count.zero_()

    @torch.no_grad()
    def update(self, adapted: list[Tensor], source: list[Tensor], momentum: float, every: int, weight: float) -> None:
        """After an image: ``average <- momentum * average + (1 - momentum) * adapted``;
        every ``every`` images, ``start <- (1 - weight) * source + weight * average``
        (one host sync per image, to read the count)."""
        ema_update_(self.averages(), adapted, momentum)
        self.count.add_(1)
        if int(self.count) >= every:
            self.count.zero_()
            for start, value, average in zip(self.starts(), source, self.averages()):
                torch.mul(value, 1.0 - weight, out=start)
                start.add_(average, alpha=weight)


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

    Where the reference code (mzhaoshuai/RLCF, ``TPT/``) goes further:

    - **A learned starting prompt.** Its prompt script starts every image from a
      16-shot CoOp context learned on ImageNet (``scripts/rlcf-prompt.sh`` lines 14
      and 61, also for the fine-grained sets, ``rlcf-prompt-fine.sh`` lines 13 and
      62; loaded in ``tpt_cls_rl.py`` lines 94-101 as the checkpoint's
      ``state_dict["ctx"]``, 4 tokens, which ``reset`` returns to). Pass that file as
      ``ctx_init`` (a path: a tensor file or a CoOp checkpoint; see
      ``CLIPClassifier.use_prompt``). The default stays the text "a photo of a"
      (the parser's default, ``params.py`` line 42: no ``--load``), since tta ships
      no CoOp context.
    - **A momentum buffer** (``ema``; ``--momentum_update``, ``params.py`` lines
      68-72, the image-encoder script's values in ``scripts/rlcf-tune.sh`` lines
      30-34 and 47-48, off by default). Its image-encoder model
      (``clip/custom_clip.py`` ``CLIPCLS_TTA``, lines 389-399 and 456-475) keeps an
      exponential moving average of the image encoder's weights: after each test
      image has been adapted *and predicted* (``tune_cls_rl.py`` line 240), the
      average moves toward the adapted weights with momentum ``ema_momentum``
      (0.9998); every ``ema_every`` images (64) the state every image starts from
      becomes ``(1 - ema_weight) * source + ema_weight * average`` (``ema_weight``
      1.0: the average itself). The prediction is never made with the average: each
      image is adapted from the current start and predicted with its own adapted
      weights. Everything goes back to the source with :meth:`reset` (the reference
      code at each new data set, lines 450-454). tta averages the adapted
      parameters (the reference code averages the whole image encoder's state dict,
      whose other entries change only in a BatchNorm tower's running statistics, see
      below); it is offered for ``adapt="prompt"`` too,
      which the reference code does not have. With it, the images of a batch run
      one after another (selection included), each from the start the images
      before it left, as the reference code's one image per batch.
    - **The fine-grained setting** (preset ``"fine_grained"``,
      ``scripts/rlcf-prompt-fine.sh`` lines 35-46: 5 steps, lr 7e-3, ViT-L/14
      reward, K = 3, otherwise the ImageNet script's values): AugMix views, which
      ``tpt_cls_rl.py`` lines 149-150 use for every data set but ImageNet's
      (``--augmix`` defaults to 1, ``params.py`` line 48; the script's own
      ``--augmix ${augmix}``, line 68, passes a variable it never sets). The
      published lr is the prompt's: the preset leaves ``lr`` to ``adapt``.

    Where tta keeps to what the published runs (a ViT-B/16 policy) do, and the
    reference code would do otherwise:

    - **Train mode when the image encoder adapts.** ``tune_cls_rl.py`` lines 216-218
      run the selection and the steps in train mode and predict in eval mode. A ViT
      tower has no dropout, so nothing changes; a BatchNorm tower (CLIP's ResNets,
      the zoo's pair) would normalise the views with their own batch statistics, and
      the running statistics those four passes move (momentum 0.1) would be the
      ones the prediction uses, until the next image's reset. tta keeps the encoder
      as trained (eval mode). On ``zoo:clip_small`` under Gaussian noise the two
      modes agree on 27% of the views' argmaxes and share 10% of the selected views.
    - **The class texts.** The reference code's are ``"<ctx_init> <class>."`` of the
      run's ``--ctx_init``, for the reward (``tpt_cls_rl.py`` line 183,
      ``tune_cls_rl.py`` line 143) and, with the image encoder adapting, for the
      policy's head too, whose model keeps the underscores of ``a_photo_of_a``
      (``clip/custom_clip.py`` lines 377-381: "a_photo_of_a goldfish.", which CLIP's
      tokenizer reads as "a _ photo _ of _ a goldfish."). Here the reward's text is
      always "a photo of a <class>." and the policy's head its own templates: the
      same as the prompt scripts' texts, not the image-encoder script's.

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
        ema: keep the momentum buffer and start each image from it (the reference
            code's ``--momentum_update``, off in its scripts and parser).
        ema_momentum: the average's momentum per image (``--tta_momentum``: 0.9998 in
            ``rlcf-tune.sh`` line 33; the parser's default is 0.9999).
        ema_every: images between refreshes of the start (``--update_freq``: 64 in
            ``rlcf-tune.sh`` line 32; the parser's default is 256).
        ema_weight: the average's weight in the refreshed start, the source's being
            ``1 - ema_weight`` (``--update_w``: 1.0 in both).
    """

    presets = {"cifar10": {}, "imagenet": {}, "fine_grained": {"steps": 5, "augmix": True}}

    def __init__(
        self,
        model: nn.Module,
        *,
        reward: str | nn.Module | None = "clip:ViT-L-14/openai",
        adapt: str = "prompt",
        sample_k: int = 3,
        sampling: str = "topk",
        ema: bool = False,
        ema_momentum: float = 0.9998,
        ema_every: int = 64,
        ema_weight: float = 1.0,
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
        if not 0.0 <= ema_momentum <= 1.0 or not 0.0 <= ema_weight <= 1.0:
            raise ValueError(f"ema_momentum and ema_weight must be in [0, 1], got {ema_momentum}, {ema_weight}")
        check_positive_int(ema_every, "ema_every")
        if ema and kwargs.get("episodic"):
            raise ValueError("ema=True carries a momentum buffer from image to image, which episodic=True would "
                             "reset before every batch; leave episodic off (every image starts afresh anyway)")
        check_clip_classifier(model, "rlcf")
        if isinstance(sample_k, bool) or not isinstance(sample_k, int) or not 2 <= sample_k <= model.num_classes:
            # the baseline is the candidates' mean reward: one candidate has no advantage
            raise ValueError(f"sample_k must be an integer in [2, {model.num_classes}] (the rewards of K candidates "
                             f"are compared with their mean), got {sample_k!r}")
        self.adapt, self.sample_k, self.sampling = adapt, sample_k, sampling
        self.adapts_prompt = adapt == "prompt"
        self.calls_forward = not self.adapts_prompt  # the image encoder adapts through the forward
        self.ema, self.ema_momentum, self.ema_every, self.ema_weight = bool(ema), ema_momentum, ema_every, ema_weight
        lr = _PAPER_LR[adapt] if lr is None else lr
        super().__init__(model, steps=steps, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
        self.reward_model = self._reward_model(reward, model)
        self.momentum_state = MomentumStart([p for _, p in self.adapted]) if self.ema else None

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

    def _follow_policy_classes(self) -> None:
        """The reward scores the policy's classes: after the policy's
        ``set_classnames`` the reward model takes the same names."""
        names = list(self.model.classnames)
        if list(self.reward_model.classnames) != names:
            if self.sample_k > len(names):
                raise ValueError(f"sample_k={self.sample_k} candidates, but the policy now has {len(names)} "
                                 "classes: wrap again with a smaller sample_k")
            self.reward_model.set_classnames(names)

    # -- the momentum buffer: what reset, snapshot and each image's start mean ------------
    def snapshot(self) -> None:
        super().snapshot()
        if getattr(self, "momentum_state", None) is not None:
            self.momentum_state.restart_from(self.source_params())

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the source parameters, a fresh optimizer and (with ``ema``) the
        momentum buffer at the source, bit-exact."""
        super().reset()
        if getattr(self, "momentum_state", None) is not None:
            self.momentum_state.restart_from(self.source_params())

    @torch.no_grad()
    def restart(self) -> None:
        """Each image starts from the source, or with ``ema`` from the momentum
        buffer's start; with a fresh optimizer either way."""
        if self.momentum_state is None:
            return super().restart()
        if self._source_state is None:
            self.snapshot()
        self.restore_adapted(self.momentum_state.starts())

    # -- a step ---------------------------------------------------------------------------
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        self._follow_policy_classes()
        if self.momentum_state is None:
            return self._adapt_images(x)
        logits, views, losses = [], 0, []
        for i in range(x.shape[0]):  # each image starts where the ones before it left the buffer
            out, record = self._adapt_images(x[i: i + 1])
            self.momentum_state.update([p.detach() for _, p in self.adapted], self.source_params(),
                                       self.ema_momentum, self.ema_every, self.ema_weight)
            logits.append(out)
            views += record.num_selected
            losses.append(record.loss)
        return torch.cat(logits), StepRecord(x.shape[0], views, torch.stack(losses).mean())

    def _adapt_images(self, x: Tensor) -> tuple[Tensor, StepRecord]:
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
