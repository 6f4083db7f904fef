"""``ttrv``: test-time reinforcement learning with vote-frequency rewards (Singh et al.,
"TTRV: Test-Time Reinforcement Learning for Vision Language Models", CVPR 2026).

TTRV treats a classifier as a policy over classes: for each test image it draws N
classes from the softmax at temperature tau (or one from each of N augmented views),
rewards each draw by its share of the N votes, and takes a GRPO step: advantages
``(r - mean) / (std + 1e-6)`` over the image's first M draws, a PPO-clipped policy
gradient, and a small KL to the source model. Draws the image's votes agree on are
reinforced; an image whose draws are unanimous gives no gradient.

The reference code (Akshit21112002/TTRV, on verl, for decoder VLMs) also subtracts
0.75 x the normalised entropy of the votes from every reward. That term is the same
for every draw of an image, so GRPO's per-image normalisation removes it: in the
released code it has no effect (``entropy_in_reward=True`` keeps that behaviour).
Here the entropy acts as a loss term of its own, ``diversity_weight`` x the entropy
of the image's mean prediction (the vote distribution's expectation, which unlike
the votes has a gradient), normalised by ln C like the votes' entropy is by the log
of the number of distinct votes.

This module is over 350 lines because one method serves two kinds of model (CLIP
classifiers with RLCF's three ``adapt`` choices, and any other classifier) in three
modes (online, episodic, single example); the rewards and losses live in
:mod:`tta.methods.grpo`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._checks import check_positive_int
from ..augment.views import Views
from .base import TTAMethod
from .clip_views import (CLIP_INTERFACE, VIEW_CHUNK, check_clip_classifier, clip_adapted_params,
                         refuse_compile_of_encoders)
from .entropy import marginal_entropy
from .grpo import clipped_policy_loss, grpo_advantages, vote_entropy, vote_rewards  # noqa: F401
from .records import TTRVRecord
from .registry import register_method

__all__ = ["TTRV", "vote_rewards", "vote_entropy", "grpo_advantages", "clipped_policy_loss"]

#: What adapts, by the kind of model: a CLIP classifier's prompt context, image
#: encoder or its norm layers (rlcf's choices); a plain classifier's norm affines
#: (Tent's) or every weight.
CLIP_ADAPT = ("prompt", "image", "image_norm")
PLAIN_ADAPT = ("norm", "all")
#: The default learning rate (AdamW) of each choice: rlcf's for the CLIP choices
#: (7e-3 on the prompt, 1e-5 on the image encoder and, unpublished, its norm layers),
#: Tent's CIFAR Adam lr for the norm affines, rlcf's image-encoder lr for all weights.
DEFAULT_LR = {"prompt": 7e-3, "image": 1e-5, "image_norm": 1e-5, "norm": 1e-3, "all": 1e-5}
#: Online, the prompt accumulates every batch's steps: rlcf's per-image 7e-3 drifts
#: (zoo:clip_small, the 4 held-out corruptions x 200 images, batch 50: zero-shot 40.25,
#: online lr 1e-4 40.25, 3e-4 40.0, 1e-3 39.6, 3e-3 41.0).
ONLINE_PROMPT_LR = 1e-3
MODES = ("online", "episodic", "single_example")
SAMPLINGS = ("softmax", "views")
class _Call(nn.Module):
    """``fn(*args)`` as the forward of a module holding ``model``, so that
    :func:`torch.func.functional_call` can run ``fn`` with ``model``'s parameters
    replaced (the source model, without a copy of it)."""

    def __init__(self, model: nn.Module, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args: Any) -> Tensor:
        return self.fn(*args)


def is_clip_classifier(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in CLIP_INTERFACE)


@register_method("ttrv")
class TTRV(TTAMethod):
    """TTRV on any classifier: a CLIP classifier (``tta.load_model("clip:...")``, the
    paper's setting) or any model returning logits.

    Per sampling round: N draws per image (``sampling="softmax"``: from the image's
    softmax at ``temperature``, with replacement; ``"views"``: one from each of N views,
    the image and N-1 random resized crops as in TPT/RLCF), rewards by vote share,
    GRPO advantages over the first ``num_train_samples`` draws, then ``inner_steps``
    updates on those draws, each minimising ``clipped_policy_loss + diversity_weight *
    H(mean prediction) / ln C + kl_weight * KL(policy || source)``. The draws, their
    sampling-time log-probabilities and the advantages are fixed for the round; every
    update runs the policy again. The KL is exact (over the classes), to the source
    parameters run through the same model (``torch.func.functional_call``: no copy).

    Defaults: the reference code's (examples/ttrv/run.sh, verl's ppo_trainer.yaml and
    reward_score/ttrl/ttt_metrics.py): 32 draws at temperature 1.0, the first 16
    trained, entropy weight 0.75, PPO clip 0.2, KL weight 0.001, AdamW. Its lr (5e-7,
    full fine-tuning of a 2B VLM, cosine warm-up over two passes of the test set)
    does not transfer: the lr follows ``adapt`` (:data:`DEFAULT_LR`). Its weight
    decay (0.01 at lr 5e-7, a decay of 5e-9 per step) is none in effect: 0 here.
    What else its actor does (ppo_trainer.yaml lines 40-51) and tta does not: it
    clips the gradient norm to 1.0 (on the zoo's CLIP pair, online, the same
    predictions with and without: the prompt's norms stay below 1, and AdamW's
    steps hardly change when the image encoder's, 8 to 12, are scaled down); its KL
    is ``low_var_kl``, the k3 estimate ``r - log r - 1`` (``r = p_ref / p``) on the
    trained draws, clamped to [-10, 10], whose gradient is in expectation that of
    KL(source || policy), where tta's exact term is KL(policy || source) (the two
    agree to second order near the source); and it caps the loss of a
    negative-advantage draw at 3 |A| (dual-clip PPO), which only a ratio above 3
    reaches (never with ``inner_steps=1``). Its protocol is not a stream either:
    two epochs over 20 or 500 unlabelled test samples (run.sh ``EPISODE=2``), then
    greedy predictions on the test set (``mode="single_example"`` is the nearest).

    Args:
        adapt: what adapts. CLIP classifiers: ``"prompt"`` (the learnable context,
            default), ``"image"`` (every image-encoder weight) or ``"image_norm"``
            (its norm layers). Other classifiers: ``"norm"`` (norm affines, with
            test-batch statistics, as Tent; default) or ``"all"``.
        mode: ``"online"`` (the model keeps what it learned across the
            stream; each batch's prediction is its last forward's, before that
            forward's update, as in Tent), ``"episodic"`` (every image starts from the
            source, adapts alone, then is predicted, as in TPT/RLCF) or
            ``"single_example"`` (the first batch: adapt on one random image of it
            for ``single_example_steps`` rounds; from then on only predict).
        sampling: ``"softmax"`` or ``"views"`` (see above).
        num_samples: draws per image (N; views per image with ``sampling="views"``).
        num_train_samples: the first M draws, those trained on (the rewards count
            all N votes).
        temperature: the policy's softmax temperature (sampling, loss and KL).
        entropy_weight: weight of the normalised vote entropy in the reward, with
            ``entropy_in_reward`` (the released code's term, which GRPO removes).
        entropy_in_reward: subtract the vote-entropy term from every reward.
        diversity_weight: weight of the entropy of the mean prediction (over the
            trained views; the image's own prediction with ``"softmax"``) divided by
            ln C: the vote entropy's term in a form with a gradient (0: off).
        kl_weight: weight of KL(policy || source model).
        clip_ratio: PPO's ratio clip (None: no clipping); acts from the second of
            ``inner_steps`` on.
        inner_steps: updates per sampling round on the same draws.
        steps: sampling rounds per batch (online) or per image (episodic).
        single_example_steps: rounds on the one image in ``"single_example"`` mode.
        augmix: AugMix the crops (``sampling="views"``).
        transform: the crop of each view, a module on (N, 3, H, W) batches.
        ctx_init: the prompt context's start when the CLIP classifier has none.
        lr: learning rate; None is :data:`DEFAULT_LR` for ``adapt`` (on the prompt
            outside episodic mode :data:`ONLINE_PROMPT_LR`, chosen on held-out
            corruptions).
        episodic: reset to the source before every batch (online mode only; per
            image is ``mode="episodic"``).
    """

    presets = {"cifar10": {}, "imagenet": {}}  # no published classifier settings: the defaults
    record_type = TTRVRecord

    def __init__(
        self,
        model: nn.Module,
        *,
        adapt: str | None = None,
        mode: str = "online",
        sampling: str = "softmax",
        num_samples: int = 32,
        num_train_samples: int = 16,
        temperature: float = 1.0,
        entropy_weight: float = 0.75,
        entropy_in_reward: bool = False,
        diversity_weight: float = 0.75,
        kl_weight: float = 0.001,
        clip_ratio: float | None = 0.2,
        inner_steps: int = 1,
        steps: int = 1,
        single_example_steps: int = 10,
        augmix: bool = False,
        transform: nn.Module | None = None,
        ctx_init: str = "a photo of a",
        optimizer: str = "adamw",
        lr: float | None = None,
        weight_decay: float = 0.0,
        episodic: bool = False,
        **kwargs,
    ) -> None:
        clip = is_clip_classifier(model)
        choices = CLIP_ADAPT if clip else PLAIN_ADAPT
        adapt = choices[0] if adapt is None else adapt
        if adapt in CLIP_ADAPT and not clip:
            check_clip_classifier(model, f"ttrv adapt={adapt!r}")  # raises, saying what is missing
        if adapt not in choices:
            kind = "a CLIP classifier" if clip else "a classifier that is not CLIP"
            raise ValueError(f"adapt must be one of {choices} for {kind}, got {adapt!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) for n in (num_samples, num_train_samples)) \
                or not 2 <= num_train_samples <= num_samples:
            raise ValueError("need integers 2 <= num_train_samples <= num_samples (GRPO compares draws), got "
                             f"{num_train_samples!r} and {num_samples!r}")
        for name, value in (("inner_steps", inner_steps), ("steps", steps),
                            ("single_example_steps", single_example_steps)):
            check_positive_int(value, name)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if clip_ratio is not None and not 0 < clip_ratio < 1:
            raise ValueError(f"clip_ratio must be in (0, 1) or None, got {clip_ratio!r}")
        if min(entropy_weight, diversity_weight, kl_weight) < 0:
            raise ValueError("entropy_weight, diversity_weight and kl_weight must be >= 0")
        if not isinstance(augmix, bool):
            raise ValueError(f"augmix must be True or False, got {augmix!r}")
        if transform is not None and not isinstance(transform, nn.Module):
            raise TypeError(f"transform must be an nn.Module on (N, 3, H, W) batches, got {type(transform).__name__}")
        if sampling != "views" and (augmix or transform is not None):
            # Only sampling="views" draws views: silently sampling from the softmax
            # instead would not be the run that was asked for.
            raise ValueError(f"augmix and transform make the views of sampling='views': with sampling={sampling!r} "
                             "they would change nothing; pass sampling='views' or drop them")
        if episodic and mode != "online":
            raise ValueError(f"episodic=True resets before every batch, which mode={mode!r} already defines; "
                             "leave episodic out")
        if kwargs.get("skip_modules", "none") != "none" and adapt != "norm":
            raise ValueError(f"skip_modules chooses norm layers: it has no effect with adapt={adapt!r}")
        self.adapt, self.mode, self.sampling = adapt, mode, sampling
        self.num_samples, self.num_train_samples = num_samples, num_train_samples
        self.temperature, self.entropy_weight, self.entropy_in_reward = temperature, entropy_weight, entropy_in_reward
        self.diversity_weight, self.kl_weight, self.clip_ratio = diversity_weight, kl_weight, clip_ratio
        self.inner_steps, self.rounds, self.single_example_steps = inner_steps, steps, single_example_steps
        # CLIP is used as trained (its ResNet towers keep their statistics, as in
        # TPT/RLCF); other classifiers normalise with test-batch statistics, as Tent.
        self.batch_stats = not clip
        if clip and adapt == "prompt" and kwargs.get("compile"):
            refuse_compile_of_encoders("ttrv adapt='prompt'")
        if clip and "bn_alpha" in kwargs:
            raise TypeError("ttrv uses a CLIP classifier as trained, without test-batch statistics, so "
                            "'bn_alpha' would change nothing; drop it")
        if adapt == "prompt" and model.ctx is None:
            model.use_prompt(ctx_init)
        # The base loop runs forward_and_adapt once per batch; the rounds run inside.
        if lr is None:
            lr = ONLINE_PROMPT_LR if (adapt == "prompt" and mode != "episodic") else DEFAULT_LR[adapt]
        super().__init__(model, steps=1, optimizer=optimizer, lr=lr,
                         weight_decay=weight_decay, episodic=episodic, **kwargs)
        one_image = mode == "episodic" or (mode == "single_example" and sampling == "softmax")
        if one_image and any(getattr(m, "tta_alpha", None) == 1.0 for m in model.modules()):
            raise ValueError(f"ttrv mode={mode!r} runs the model on one image at a time, which BatchNorm test "
                             "statistics alone would normalise by itself: pass bn_alpha < 1 (e.g. 0.1)"
                             + (" or sampling='views'" if mode == "single_example" else ""))
        self.views = Views(num_samples, use_augmix=augmix, transform=transform) if sampling == "views" else None
        self.single_example_done = False

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        if self.adapt == "norm":
            return super().select_params()
        if self.adapt == "all":
            return list(self.model.named_parameters())
        return clip_adapted_params(self.model, self.adapt, "ttrv")

    # -- the policy ------------------------------------------------------------------------
    @torch.no_grad()
    def policy_inputs(self, x: Tensor, views: bool) -> Tensor:
        """What the policy runs on, (B, V, ...): the images (V = 1) or their views
        (V = N, view 0 the image itself); with the prompt adapting, their image
        features (the image encoder is frozen, so they are computed once)."""
        if self.adapt != "prompt":
            return self.views(x) if views else x.unsqueeze(1)
        per_chunk = max(1, VIEW_CHUNK // (self.num_samples if views else 1))
        features = []
        for images in x.split(per_chunk):
            pixels = self.views(images) if views else images.unsqueeze(1)
            features.append(self.model.encode_image(pixels.flatten(0, 1)).view(*pixels.shape[:2], -1))
        return torch.cat(features)

    def policy(self, inputs: Tensor) -> Tensor:
        """The classifier's logits (B, V, C) on ``inputs`` (B, V, ...)."""
        flat = inputs.flatten(0, 1)
        logits = self.model.logits(flat) if self.adapt == "prompt" else self.model(flat)
        return logits.view(*inputs.shape[:2], -1)

    def reference_logits(self, inputs: Tensor) -> Tensor:
        """The source model's logits (B, V, C): the policy run with the source values
        of the adapted parameters. They take gradients as the policy's do (a graph
        that is dropped at once), because kernels differ with and without them (oneDNN
        convolutions by ~1e-5): so the KL is exactly 0 while the policy is the source."""
        source = {f"model.{name}": p0.detach().requires_grad_()
                  for (name, _), p0 in zip(self.adapted, self.source_params())}
        return functional_call(_Call(self.model, self.policy), source, (inputs,)).detach()

    def draw_log_probs(self, log_p: Tensor, draws: Tensor) -> Tensor:
        """log pi of each draw (B, M): from the image's distribution (``"softmax"``),
        or each from its own view's (``"views"``)."""
        if self.sampling == "softmax":
            return log_p[:, 0].gather(1, draws)
        return log_p[:, : draws.shape[1]].gather(2, draws.unsqueeze(2)).squeeze(2)

    # -- one round: draw, reward, update -----------------------------------------------------
    def adapt_round(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor | None]]:
        """One sampling round on ``inputs`` (B, V, ...) and its ``inner_steps``
        updates. Returns the logits (B, V, C) of the last forward (before its update)
        and the round's statistics (0-dim tensors)."""
        b, m, tau = inputs.shape[0], self.num_train_samples, self.temperature
        trained = slice(None) if self.sampling == "softmax" else slice(0, m)
        ref_log_p = None
        if self.kl_weight > 0:
            ref_log_p = (self.reference_logits(inputs)[:, trained].float() / tau).log_softmax(-1)
        for k in range(self.inner_steps):
            logits = self.policy(inputs)
            log_p = (logits.float() / tau).log_softmax(-1)
            if k == 0:
                if log_p.shape[-1] < 2:  # the rewards' and the diversity term's entropies are over ln C
                    raise ValueError(f"ttrv needs a classifier over at least 2 classes, got {log_p.shape[-1]}: "
                                     "with one class every draw agrees and there is nothing to learn")
                with torch.no_grad():
                    probs = log_p.exp()
                    draws = (torch.multinomial(probs[:, 0], self.num_samples, replacement=True)
                             if self.sampling == "softmax"
                             else torch.multinomial(probs.flatten(0, 1), 1).view(b, self.num_samples))
                    rewards, counts, entropy = vote_rewards(draws, log_p.shape[-1], self.entropy_weight,
                                                            self.entropy_in_reward)
                    advantages = grpo_advantages(rewards[:, :m])
                    old_log_p = self.draw_log_probs(log_p, draws[:, :m])
            pg, clip_fraction = clipped_policy_loss(self.draw_log_probs(log_p, draws[:, :m]), old_log_p,
                                                    advantages, self.clip_ratio)
            loss = pg
            if self.diversity_weight > 0:
                spread = marginal_entropy(logits[:, trained].float() / tau).mean() / math.log(log_p.shape[-1])
                loss = loss + self.diversity_weight * spread
            kl = None
            if ref_log_p is not None:
                own = log_p[:, trained]
                kl = (own.exp() * (own - ref_log_p)).sum(-1).mean()
                loss = loss + self.kl_weight * kl
            self.backward(loss)
            self.step()
        stats = {"loss": loss.detach(), "mean_reward": rewards[:, :m].mean(), "vote_entropy": entropy.mean(),
                 "num_unanimous": (counts.amax(dim=1) == self.num_samples).sum(),
                 "kl": None if kl is None else kl.detach(), "clip_fraction": clip_fraction.detach()}
        return logits.detach(), stats

    # -- the modes ---------------------------------------------------------------------------
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, TTRVRecord]:
        views = self.sampling == "views"
        if self.mode == "online":
            inputs = self.policy_inputs(x, views)
            for _ in range(self.rounds):
                logits, stats = self.adapt_round(inputs)
            return logits[:, 0], TTRVRecord(x.shape[0], x.shape[0], **stats)
        if self.mode == "episodic":
            return self._episodes(x, views)
        stats: dict[str, Any] = {}
        num_trained = 0
        if not self.single_example_done:
            pick = torch.randint(x.shape[0], (1,), device=x.device)
            one = self.policy_inputs(x.index_select(0, pick), views)
            for _ in range(self.single_example_steps):
                _, stats = self.adapt_round(one)
            num_trained = 1
        with torch.no_grad():
            logits = self.policy(self.policy_inputs(x, views=False))[:, 0]
        self.single_example_done = True
        return logits, TTRVRecord(x.shape[0], num_trained, **stats)

    def _episodes(self, x: Tensor, views: bool) -> tuple[Tensor, TTRVRecord]:
        """Each image from the source parameters and a fresh optimizer: ``steps``
        rounds on its own draws, then its prediction; the source again at the end."""
        inputs = self.policy_inputs(x, views)
        logits, per_image = [], []
        for i in range(x.shape[0]):
            self.restore_adapted()
            for _ in range(self.rounds):
                _, stats = self.adapt_round(inputs[i: i + 1])
            per_image.append(stats)
            with torch.no_grad():
                logits.append(self.policy(inputs[i: i + 1, :1])[:, 0])
        self.restore_adapted()
        merged = {k: None if per_image[0][k] is None else torch.stack([s[k] for s in per_image]).float().mean()
                  for k in per_image[0]}
        merged["num_unanimous"] = torch.stack([s["num_unanimous"] for s in per_image]).sum()
        return torch.cat(logits), TTRVRecord(x.shape[0], x.shape[0], **merged)

    # -- state -------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "single_example_done": self.single_example_done}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.single_example_done = bool(state.get("single_example_done", False))
