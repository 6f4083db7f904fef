"""``foa``: forward-optimization adaptation (Niu et al., "Test-Time Model
Adaptation with Only Forward Passes", ICML 2024; official code
github.com/mr-eggplant/FOA).

The model stays frozen: no backward pass, no weight changes. FOA inserts ``Np``
prompt tokens after the class token of a Vision Transformer and searches over them
with CMA-ES, one generation per test batch: CMA-ES proposes ``popsize`` prompts, the
previous batch's best prompt is scored again beside them, and each candidate's
fitness is the batch-summed prediction entropy plus ``lambda * B / 64`` times the
squared distance of the test batch's per-layer CLS statistics (mean and std) from
the source's. The batch is predicted by the fittest candidate, its final CLS feature
shifted toward the source ("back-to-source activation shifting": source mean minus
an EMA of the test means).

Deviations from the official code (each kept small, each named in the class
docstring): the candidates are evaluated as one batch (or chunks of candidates),
not one forward each; the prompt init is drawn once when wrapping (``reset()``
returns to it, the official code redraws it per domain); CMA-ES draws from a
private copy of NumPy's global random state (so the user's NumPy RNG neither feeds
nor is changed by it); a batch of one image is refused.

This module is over 350 lines because FOA runs the ViT itself (the prompt tokens
go in between the embedding and the first block, and every block's class token is
read), beside its step (the search, the fitness, the shift); the CMA-ES bookkeeping
lives in :mod:`tta.methods.cma_search`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive_int
from .base import TTAMethod
from .cma_search import CMASearch
from .entropy import softmax_entropy
from .inputs import floating_dtype, to_model_input
from .records import FOARecord
from .registry import register_method

__all__ = ["FOA", "find_vit"]

#: what FOA reads of a timm VisionTransformer
VIT_API = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "get_classifier", "num_prefix_tokens")
_POOLS = ("token", "avg", "max", "avgmax")


def find_vit(model: nn.Module, method: str = "foa") -> tuple[nn.Module, Any]:
    """The timm ``VisionTransformer`` inside ``model`` and the input normalisation
    in front of it: ``model`` itself (no normalisation) or ``model.backbone`` of a
    :class:`~tta.models.ImageClassifier` (its ``normalize``). Raise a ``TypeError``
    naming the model and what FOA needs otherwise."""
    name = type(model).__name__
    for vit, normalize in ((model, None), (getattr(model, "backbone", None), getattr(model, "normalize", None))):
        if isinstance(vit, nn.Module) and all(hasattr(vit, a) for a in VIT_API):
            break
    else:
        inner = getattr(model, "backbone", None)
        what = f"{name} (backbone {type(inner).__name__})" if isinstance(inner, nn.Module) else name
        raise TypeError(
            f"{method} needs a Vision Transformer: it inserts prompt tokens into the token sequence and reads "
            f"the class token of every block. {what} is not one (expected timm's VisionTransformer interface: "
            f"{', '.join(VIT_API)}; e.g. tta.load_model('timm:vit_base_patch16_224') or 'zoo:vit_tiny_ln')"
        )
    blocks = list(vit.blocks)
    missing = [i for i, b in enumerate(blocks[1:], 1) if not isinstance(getattr(b, "norm1", None), nn.Module)]
    if not blocks or missing:
        raise TypeError(f"{method}: the blocks of {type(vit).__name__} have no pre-attention norm (norm1) "
                        f"(block {missing[:1]}); FOA's per-layer statistics are taken after it")
    pool = getattr(vit, "global_pool", "token")
    if getattr(vit, "attn_pool", None) is not None or pool not in _POOLS:
        raise TypeError(f"{method}: {type(vit).__name__} pools its tokens with global_pool={pool!r}; FOA's "
                        f"per-layer statistics need class-token or average pooling ({', '.join(_POOLS)})")
    if isinstance(vit.get_classifier(), (tuple, list)):
        raise TypeError(f"{method}: {type(vit).__name__} is distilled (a distillation token and a second head); "
                        "FOA's fitness and activation shift read the class token and one head, as the official "
                        "ViT-B/16: use the network without distillation (e.g. deit_tiny_patch16_224)")
    return vit, normalize


def _xavier_scale(vit: nn.Module, width: int) -> float:
    """VPT's prompt init range, sqrt(6 / (3 * patch area + width)): 0.0625 for ViT-B/16."""
    size = getattr(vit.patch_embed, "patch_size", (16, 16))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return math.sqrt(6.0 / (3 * size[0] * size[1] + width))


@register_method("foa")
class FOA(TTAMethod):
    """FOA. Defaults are the official code's (its only setting: ViT-B/16 on
    ImageNet-C, batch 64): 3 prompt tokens, CMA-ES with population 27 (+1: the
    previous best), sigma0 1, seed 2020, lambda 0.4 scaled by B/64, activation shift
    step 1 with EMA weight 0.1, source statistics over 50,000 images.

    Args:
        source_loader: clean source images (labels unused): an iterable of
            ``(images in [0, 1], labels)`` batches or of image batches; tta-bench passes
            :class:`~tta.bench.source_data.SourceBatches` of ``data.source_root``. Read
            once, when wrapping, for the source statistics.
        source_statistics: ``(mean, std)`` of the per-layer features over source
            images, each ``(depth * width,)`` (see :meth:`features_of`), instead of a
            loader (e.g. ``method.source_mean, method.source_std`` of another run).
        num_source_images: source images the statistics average (the official code
            reads all 50,000 clean ImageNet validation images; the paper finds 32 or
            more enough, Fig. 2c). ``None``: the whole loader.
        num_prompts: prompt tokens ``Np``, inserted after the class (and register)
            tokens, without position embedding, before the first block. ``0`` is the
            official shift-only ablation (one forward per batch, no search).
        popsize: CMA-ES population per batch (the official 27, pycma's
            ``4 + 3 ln D`` for ViT-B's D = 2304); ``None``: pycma's rule for this D.
            Each batch scores ``popsize + 1`` candidates.
        sigma0: CMA-ES initial step size (the search starts at the zero prompt).
        cma_seed: CMA-ES's random seed.
        prompt_init_scale: the first "previous best" prompt is U(-s, s); ``None``:
            VPT's xavier range ``sqrt(6 / (3 * patch area + width))`` (0.0625 for
            ViT-B/16). Drawn from torch's RNG when wrapping.
        fitness_lambda: weight of the statistics term, scaled by ``B / 64``.
        shift_step: the activation shift's step ``gamma`` (0: no shift).
        shift_momentum: weight of the newest batch in the EMA of the test means
            (``alpha``; the EMA is ``(1 - alpha) * m + alpha * mean``).
        candidates_per_forward: candidates evaluated in one forward (``K * B``
            images); ``None``: all of them on a GPU, 4 on the CPU (measured on one
            thread, zoo:vit_tiny_ln, batch 64, 28 candidates: see the comment in
            :meth:`score_candidates`).

    Per batch: ``popsize + 1`` forwards of the batch (28 at the defaults, batched),
    no backward; the fitness values come to the host once (CMA-ES runs in NumPy).

    Models: timm ViTs (``find_vit``): class token (statistics of the class token
    after the next block's ``norm1``, and after the final ``norm`` for the last
    block), register tokens, or average pooling without a class token (then the
    pooled tokens, prompts left out: the zoo's ``vit_tiny_ln``). CNNs are refused.

    Deviations from the official code: the candidates run as one batch, not one
    forward each (same values up to float rounding); the prompt init is drawn once
    and ``reset()`` returns to it (the official code redraws it per domain); CMA-ES
    draws from its own copy of NumPy's global random state (the official stream,
    isolated from other NumPy users); batches of one image are refused (the
    unbiased std is NaN; the paper's FOA-I buffers single images). ``compile``
    compiles the model's forward, which FOA does not call (it runs the blocks).

    State: the source statistics, the prompts (``prompts``: the current best), the
    EMA of the test means, and the CMA-ES object, pickled into the state dict
    (``_extra_state["cma"]``, a uint8 tensor, empty until the first batch) so that a
    restored method goes on exactly as the saved one would. Loading a state
    unpickles it with an allow-list (pycma's classes, NumPy's array and
    random-state constructors; anything else is refused). ``reset()`` starts a fresh CMA-ES
    from the same seed and keeps the source statistics.

    Presets: ``"imagenet"`` is these defaults (the official ViT-B/16 ImageNet-C
    setting, batch 64). ``"cifar10"`` is the same: the paper has no CIFAR setting,
    and the only lambda that depends on the batch size is already scaled by B/64.
    """

    batch_stats = False
    has_optimizer = False
    adapts_norm_params = False
    record_type = FOARecord
    #: the kind of model the method needs (the generic method tests skip it)
    requires = "vit"
    presets = {"cifar10": {}, "imagenet": {}}

    def __init__(
        self,
        model: nn.Module,
        *,
        source_loader: Iterable | None = None,
        source_statistics: tuple[Tensor, Tensor] | None = None,
        num_source_images: int | None = 50000,
        num_prompts: int = 3,
        popsize: int | None = 27,
        sigma0: float = 1.0,
        cma_seed: int = 2020,
        prompt_init_scale: float | None = None,
        fitness_lambda: float = 0.4,
        shift_step: float = 1.0,
        shift_momentum: float = 0.1,
        candidates_per_forward: int | None = None,
        **kwargs,
    ) -> None:
        vit, normalize = find_vit(model)
        check_int(num_prompts, "num_prompts", minimum=0)
        check_int(popsize, "popsize", minimum=2, optional=True)
        check_positive_int(candidates_per_forward, "candidates_per_forward", optional=True)
        check_int(num_source_images, "num_source_images", minimum=2, optional=True)
        if not 0.0 <= shift_momentum <= 1.0 or sigma0 <= 0 or fitness_lambda < 0:
            raise ValueError(f"need 0 <= shift_momentum <= 1, sigma0 > 0 and fitness_lambda >= 0, got "
                             f"{shift_momentum}, {sigma0}, {fitness_lambda}")
        if source_loader is None and source_statistics is None:
            raise ValueError(
                "foa needs clean source images for its source statistics: set data.source_root in tta-bench, "
                "or pass source_loader= in Python (an iterable of (images in [0, 1], labels) batches, e.g. "
                "tta.bench.source_data.SourceBatches), or source_statistics=(mean, std)")
        super().__init__(model, **kwargs)
        # Plain attributes, not submodules: the ViT is (inside) self.model already.
        object.__setattr__(self, "vit", vit)
        self._normalize = normalize
        self.num_prompts, self.popsize, self.sigma0, self.cma_seed = num_prompts, popsize, sigma0, cma_seed
        self.fitness_lambda, self.shift_step, self.shift_momentum = fitness_lambda, shift_step, shift_momentum
        self.candidates_per_forward = candidates_per_forward
        self.depth = len(vit.blocks)
        param = next(model.parameters())
        width = vit.head.in_features if isinstance(vit.head, nn.Linear) else getattr(vit, "num_features")
        self.width = width
        if source_statistics is not None:
            mean, std = (torch.as_tensor(t).detach().float().flatten() for t in source_statistics)
            if mean.shape != (self.depth * width,) or std.shape != mean.shape:
                raise ValueError(f"source_statistics must be (mean, std) of shape ({self.depth * width},) "
                                 f"({self.depth} blocks x width {width}), got {tuple(mean.shape)}, {tuple(std.shape)}")
        else:
            mean, std = self._source_statistics(source_loader, num_source_images)
        self.register_buffer("source_mean", mean.to(param.device))
        self.register_buffer("source_std", std.to(param.device))
        scale = _xavier_scale(vit, width) if prompt_init_scale is None else prompt_init_scale
        init = torch.empty(num_prompts, width).uniform_(-scale, scale)  # torch's global RNG, as the official
        self.register_buffer("prompts", init.to(param.device))
        self.register_buffer("test_mean_ema", torch.zeros(width, device=param.device))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool, device=param.device))
        self._new_search()

    # -- the model, token by token ------------------------------------------------------
    def _embed(self, x: Tensor) -> Tensor:
        """Tokens after the position embedding, (B, T, D): shared by every candidate."""
        vit = self.vit
        x = self._normalize(x) if self._normalize is not None else x
        tokens = vit._pos_embed(vit.patch_embed(x))
        return vit.patch_drop(tokens) if hasattr(vit, "patch_drop") else tokens

    def _pool(self, tokens: Tensor) -> Tensor:
        """The model's pooling over the tokens (prompts already left out)."""
        vit = self.vit
        pool = getattr(vit, "global_pool", "token")
        if pool == "token":
            return tokens[:, 0]
        if not getattr(vit, "pool_include_prefix", False):
            tokens = tokens[:, vit.num_prefix_tokens:]
        if pool == "avg":
            return tokens.mean(dim=1)
        if pool == "max":
            return tokens.amax(dim=1)
        return 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))

    def features_of(self, tokens: Tensor, prompts: Tensor | None):
        """Run the blocks on ``tokens`` (B, T, D) with each of ``prompts`` (K, Np, D)
        inserted after the prefix tokens (``None``: no prompt). Yields the feature
        of each layer, (K * B, D), candidate-major: for block i < L the pooled
        class token after block i+1's ``norm1``, for the last block the head's
        input (after ``norm``, pooling and ``fc_norm``)."""
        vit, pre = self.vit, self.vit.num_prefix_tokens
        batch, _, width = tokens.shape
        num = 0 if prompts is None else prompts.shape[1]
        if num:
            k = prompts.shape[0]
            tokens = torch.cat([tokens[:, :pre].repeat(k, 1, 1),
                                prompts.to(tokens.dtype).repeat_interleave(batch, dim=0),
                                tokens[:, pre:].repeat(k, 1, 1)], dim=1)
        h = vit.norm_pre(tokens) if hasattr(vit, "norm_pre") else tokens
        token_pool = getattr(vit, "global_pool", "token") == "token"
        blocks = list(vit.blocks)
        for i, block in enumerate(blocks):
            h = block(h)
            # The class token alone where it is what the head reads (norms act per token);
            # otherwise the tokens without the prompts.
            kept = h[:, :1] if token_pool else (torch.cat([h[:, :pre], h[:, pre + num:]], dim=1) if num else h)
            if i + 1 < len(blocks):
                yield self._pool(blocks[i + 1].norm1(kept))
            else:
                yield vit.forward_head(vit.norm(kept), pre_logits=True)

    @torch.no_grad()
    def _source_statistics(self, loader: Iterable, limit: int | None) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and unbiased std of the per-layer features of the
        source images, without prompts (the official ``obtain_origin_stat``)."""
        total, sums, squares, shift = 0, None, None, None
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(images, Tensor):
                raise TypeError(f"foa: source_loader must yield image tensors or (images, labels) batches, "
                                f"got {type(images).__name__}")
            if limit is not None:
                images = images[: limit - total]
            tokens = self._embed(to_model_input(images, self.model))
            feats = torch.cat([f.double() for f in self.features_of(tokens, None)], dim=1)
            if shift is None:  # sums about the first batch's mean: no cancellation
                shift = feats.mean(0)
                sums, squares = torch.zeros_like(shift), torch.zeros_like(shift)
            centred = feats - shift
            sums += centred.sum(0)
            squares += centred.square().sum(0)
            total += feats.shape[0]
            if limit is not None and total >= limit:
                break
        if total < 2:
            raise ValueError(f"foa: the source statistics need at least 2 source images, got {total}")
        mean = sums / total
        var = (squares - total * mean.square()) / (total - 1)
        return (shift + mean).float(), var.clamp_min(0).sqrt().float()

    # -- the search state ---------------------------------------------------------------
    def _new_search(self) -> None:
        """A fresh CMA-ES (the same seed: the same draws) whose first "previous
        best" is the ``prompts`` buffer."""
        self._cma = CMASearch(self.num_prompts * self.width, self.popsize, self.sigma0, self.cma_seed) \
            if self.num_prompts else None
        self._best = self.prompts.detach().double().cpu().flatten().numpy().copy()

    def get_extra_state(self) -> dict[str, Any]:
        state = super().get_extra_state()
        data = self._cma.to_bytes(self._best) if self._cma is not None and self._cma.told else b""
        state["cma"] = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
                        else torch.zeros(0, dtype=torch.uint8))
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        data = state.get("cma")
        if data is None or data.numel() == 0:
            self._new_search()  # the buffers (the first "previous best") are loaded first
        else:
            self._cma, self._best = CMASearch.from_bytes(data.cpu().numpy().tobytes())

    # -- one step -----------------------------------------------------------------------
    def _chunk(self, device: torch.device, total: int) -> int:
        if self.candidates_per_forward is not None:
            return self.candidates_per_forward
        # Measured on the CPU (1 thread, zoo:vit_tiny_ln, batch 64, 28 candidates, a shared
        # 2-core machine): chunks of 4 candidates (256 images) 9.6 s a batch, 2: 11.1 s,
        # 7: 13.5 s, all 28 at once (1792 images, whose activations outgrow the caches):
        # 17.6 s. On a GPU one forward of all candidates keeps it busiest.
        return total if device.type == "cuda" else 4

    def score_candidates(self, tokens: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fitness of each of ``candidates`` (K, Np, D) on the batch ``tokens``:
        ``fitness``, ``entropy``, ``discrepancy`` (K,) and the head inputs
        (K, B, D), unshifted. ``fitness = entropy + lambda * B / 64 * discrepancy``;
        entropy is summed over the batch, discrepancy sums the squared differences
        of the batch's per-dimension mean and unbiased std from the source's over
        every layer's features."""
        batch = tokens.shape[0]
        chunk = self._chunk(tokens.device, candidates.shape[0])
        src_mean = self.source_mean.view(self.depth, -1)
        src_std = self.source_std.view(self.depth, -1)
        entropies, discrepancies, heads = [], [], []
        head = self.vit.get_classifier()
        for start in range(0, candidates.shape[0], chunk):
            part = candidates[start: start + chunk]
            k = part.shape[0]
            discrepancy = torch.zeros(k, device=tokens.device)
            for i, feats in enumerate(self.features_of(tokens, part)):
                feats = feats.float().view(k, batch, -1)
                std, mean = torch.std_mean(feats, dim=1, correction=1)
                discrepancy = discrepancy + (std - src_std[i]).square().sum(1) + (mean - src_mean[i]).square().sum(1)
            logits = head(feats.view(k * batch, -1).to(tokens.dtype)).float().view(k, batch, -1)
            entropies.append(softmax_entropy(logits).sum(-1))
            discrepancies.append(discrepancy)
            heads.append(feats)
        entropy, discrepancy = torch.cat(entropies), torch.cat(discrepancies)
        fitness = entropy + self.fitness_lambda * batch / 64 * discrepancy
        return fitness, entropy, discrepancy, torch.cat(heads)

    def _shifted_logits(self, feats: Tensor) -> Tensor:
        """The head on ``feats`` (B, D) moved by ``shift_step * (source mean -
        EMA of test means)``; unshifted before the EMA has a batch (the official lag:
        batch t is shifted by the EMA of batches 1..t-1)."""
        shift = self.shift_step * (self.source_mean[-self.width:] - self.test_mean_ema)
        shift = torch.where(self.ema_started, shift, torch.zeros_like(shift))
        head = self.vit.get_classifier()
        return head((feats + shift).to(floating_dtype(self.model) or feats.dtype)).float()

    def _update_ema(self, batch_mean: Tensor) -> None:
        a = self.shift_momentum
        ema = torch.where(self.ema_started, (1 - a) * self.test_mean_ema + a * batch_mean, batch_mean)
        self.test_mean_ema.copy_(ema)
        self.ema_started.fill_(True)

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, FOARecord]:
        batch = x.shape[0]
        if batch < 2:
            raise ValueError("foa needs at least 2 images per batch: its fitness takes the unbiased std of the "
                             "features over the batch (NaN for one image); the paper's FOA-I for single images "
                             "buffers them, which tta does not implement")
        tokens = self._embed(x)
        if self._cma is None:  # num_prompts=0: the shift-only ablation, one forward
            *_, feats = self.features_of(tokens, None)
            feats = feats.float()
            logits = self._shifted_logits(feats)
            self._update_ema(feats.mean(0))
            return logits, FOARecord(num_samples=batch, num_selected=batch)
        asked, rng_after_ask = self._cma.ask()
        solutions = asked + [self._best]
        host = torch.from_numpy(np.stack(solutions))
        if x.device.type == "cuda":
            host = host.pin_memory()  # copied without waiting for the device queue
        candidates = host.to(x.device, non_blocking=True).float().view(len(solutions), self.num_prompts, self.width)
        fitness, entropy, discrepancy, feats = self.score_candidates(tokens, candidates)
        # The one host sync of a step, inherent to FOA: CMA-ES (pycma, NumPy) ranks the
        # candidates by their fitness on the host before it can propose the next ones.
        values = fitness.double().cpu().numpy()
        ranked = np.where(np.isnan(values), np.inf, values)
        best = int(np.argmin(ranked))  # the first of equals, as the official strict "<"
        logits = self._shifted_logits(feats[best])
        self._update_ema(feats.mean(1).mean(0))
        self.prompts.copy_(candidates[best])
        self._cma.tell(solutions, values.tolist(), rng_after_ask)
        self._best = np.array(solutions[best], dtype=np.float64)
        record = FOARecord(num_samples=batch, num_selected=batch, loss=float(values[best]), entropy=entropy[best],
                           discrepancy=discrepancy[best], kept_best=best == len(solutions) - 1)
        return logits, record

    def extra_repr(self) -> str:
        candidates = self._cma.es.popsize + 1 if self._cma is not None else 0
        return f"method={self.method_name!r}, num_prompts={self.num_prompts}, candidates_per_batch={candidates}"
