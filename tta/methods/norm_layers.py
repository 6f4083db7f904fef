"""Norm layers on test-batch statistics: BatchNorm switched to the statistics of
each batch (optionally mixed with the source ones by ``alpha``, weighted per sample
for DeYO, or per group of stacked views), without copying or replacing the layers."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm


NORM_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def weighted_stats(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over the samples, weighted by ``weight``
    (B,). Two (B,) x (B, C*HW) products: much cheaper on CPUs than broadcasting the
    weight over the activations or ``var_mean``, and sync-free. Computed in float32
    (``E[x^2] - E[x]^2`` needs the precision)."""
    with torch.autocast(x.device.type, enabled=False):
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # (B, H*W, C) is a view of a channels-last tensor; (B, C, H*W) a copy.
            flat, eq = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]).float(), "b,bnc->c"
        else:
            flat, eq = x.reshape(x.shape[0], x.shape[1], -1).float(), "b,bcn->c"
        w = weight.float()
        denom = (w.sum() * (flat.numel() // (flat.shape[0] * x.shape[1]))).clamp_min(1.0)
        mean = torch.einsum(eq, w, flat) / denom
        var = (torch.einsum(eq, w, flat * flat) / denom - mean * mean).clamp_min(0)
    return mean, var


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (B, C, ...) over every dimension
    but the channels, as train-mode BatchNorm computes them (in float32 for half
    precision input).

    On the CPU, for contiguous float32 input, two passes of sums (the mean, then the
    centred squares as squared row norms): measured on the first stage of ResNet-20
    at batch 200 (200 x 16 x 32 x 32, 1 thread), 2.0 ms against 19 ms for
    ``torch.var_mean`` and 6.8 ms for native train-mode BatchNorm's whole forward,
    and as accurate (inverse std within ~2e-7 of native BatchNorm's, relative).
    Elsewhere ``torch.var_mean``."""
    dims = [0, *range(2, x.dim())]
    if not _fast_cpu_stats(x):
        # Half precision has too few bits for the sums of squares: float32.
        low = x.dtype in (torch.float16, torch.bfloat16)
        var, mean = torch.var_mean(x.float() if low else x, dim=dims, correction=0)
        return mean, var
    n = x.numel() // x.shape[1]
    # Summing the contiguous rows first, then the batch: 3.7x faster than one sum
    # over dims (0, 2, 3) (0.28 ms against 1.0 ms, the shape above).
    mean = x.flatten(2).sum(2).sum(0) / n
    centred = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).flatten(2)
    # Row norms reduce in one read; vecdot writes the squares out first (on tensors
    # out of cache, 1 thread: 0.55 against 1.1 ms at 200 x 16 x 1024, 7.3 against
    # 110 ms at ResNet-50's 64 x 256 x 3136; as accurate).
    return mean, torch.linalg.vector_norm(centred, dim=2).square().sum(0) / n


def _fast_cpu_stats(x: Tensor) -> bool:
    # Outside torch.func transforms (vmap of a custom autograd Function needs rules
    # this path does not need elsewhere) and outside tracing (dynamo keeps the native op).
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 3 and x.is_contiguous()
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling())


class _CPUTrainBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm (statistics of the batch, none kept) with
    :func:`channel_moments` for the statistics and the native kernels for the
    normalisation and the backward: the forward costs 0.54x the native one on the
    CPU (ResNet-20, batch 200, 1 thread: 3.6 ms against 6.8 ms in the first stage).
    The backward is native BatchNorm's own, given the same statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        mean, var = channel_moments(x)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    @once_differentiable  # the statistics are saved detached: no second derivative
    def backward(ctx, grad: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, weight, None, None, mean, invstd, True, ctx.eps, need)
        return gx, gw, gb, None


def _grouped_bn_forward(self: _BatchNorm, x: Tensor, groups: int) -> Tensor:
    """``groups`` consecutive equal slices of the batch (e.g. the views of a batched
    teacher forward), each normalised by its own statistics (mixed with the source
    ones by ``alpha``): what a separate forward per slice would compute, in one pass."""
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} rows cannot be cut into {groups} equal groups")
    rows, channels = x.shape[0] // groups, x.shape[1]
    weight = self.weight.repeat(groups) if self.weight is not None else None
    bias = self.bias.repeat(groups) if self.bias is not None else None
    # The slices become channels of one native batch norm, so their statistics are
    # per slice and channel: its fused kernel beats the statistics by hand (CPU, 8 x
    # 200 x 16 x 32 x 32: 207 ms against 315 ms with var_mean spelled out).
    spread = x.reshape(groups, rows, channels, -1).transpose(0, 1).reshape(rows, groups * channels, -1)
    if self.tta_alpha == 1.0:
        out = F.batch_norm(spread, None, None, weight, bias, True, 0.0, self.eps)
    else:
        var, mean = torch.var_mean(spread.float(), dim=(0, 2), correction=0)
        a = self.tta_alpha
        mean = a * mean + (1 - a) * self.running_mean.repeat(groups)
        var = a * var + (1 - a) * self.running_var.repeat(groups)
        dtype = weight.dtype if weight is not None else x.dtype
        out = F.batch_norm(spread, mean.to(dtype), var.to(dtype), weight, bias, False, 0.0, self.eps)
    return out.reshape(rows, groups, channels, -1).transpose(0, 1).reshape(x.shape)


def _adaptive_bn_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    alpha: float = self.tta_alpha
    weight: Tensor | None = self.tta_sample_weight
    if self.tta_groups > 1:
        return _grouped_bn_forward(self, x, self.tta_groups)
    if weight is None and alpha == 0.0:
        # The source statistics alone: exactly eval-mode BatchNorm.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    if weight is None and alpha == 1.0 and torch.is_grad_enabled():
        if _fast_cpu_stats(x):
            return _CPUTrainBatchNorm.apply(x, self.weight, self.bias, self.eps)
        # Native train-mode BatchNorm: its fused backward is the fastest path.
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    if weight is None and not torch.is_grad_enabled():
        # No gradient through the statistics: the batch's moments, then the fused
        # eval-mode kernel below.
        mean, var = channel_moments(x)
    else:
        if weight is None:
            weight = torch.ones(x.shape[0], device=x.device)
        elif weight.shape[0] != x.shape[0]:
            # BatchNorm over tokens (LeViT's BatchNorm1d on (B, N, C).flatten(0, 1)):
            # each image owns x.shape[0] / B consecutive rows.
            if x.shape[0] % weight.shape[0]:
                raise ValueError(
                    f"{type(self).__name__} sees {x.shape[0]} rows for a batch of {weight.shape[0]} "
                    "images, which is no whole number per image: per-sample statistics are undefined"
                )
            weight = weight.repeat_interleave(x.shape[0] // weight.shape[0])
        # With a weight: statistics of the selected samples only, as if the batch
        # were that subset, without a host sync to gather them.
        mean, var = weighted_stats(x, weight)
    if alpha != 1.0:
        mean = alpha * mean + (1 - alpha) * self.running_mean
        var = alpha * var + (1 - alpha) * self.running_var
    if mean.requires_grad:
        # The fused op does not differentiate through given statistics: spell it out.
        shape = (1, -1, *([1] * (x.dim() - 2)))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out = (x - mean.view(shape).to(x.dtype)) * scale.view(shape).to(x.dtype)
        return out + self.bias.view(shape).to(x.dtype) if self.bias is not None else out
    # Statistics in the parameters' dtype: float32 under autocast, float64 in a double model.
    dtype = self.weight.dtype if self.weight is not None else x.dtype
    return F.batch_norm(x, mean.to(dtype), var.to(dtype), self.weight, self.bias, False, 0.0, self.eps)


_SWAPPED: dict[tuple[type, Callable], type] = {}


def swap_forward(module: _BatchNorm, forward: Callable[[_BatchNorm, Tensor], Tensor], prefix: str) -> None:
    """Give ``module`` a subclass of its class whose normalisation is ``forward``
    (one subclass per class and forward, named ``prefix`` + the class's name; the
    state-dict keys are unchanged). A module already swapped to ``forward`` is left
    as it is. timm's norm-act layers (``BatchNormAct2d``: the norm, then ``drop`` and
    ``act``) keep their dropout and activation after ``forward``."""
    base = type(module)
    if getattr(base, "tta_norm_forward", None) is forward:
        return
    norm_act = isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module)
    module.__class__ = _swapped_class(base, forward, prefix, norm_act)


def _swapped_class(base: type, forward: Callable[[_BatchNorm, Tensor], Tensor], prefix: str, norm_act: bool) -> type:
    key = (base, forward)
    if key not in _SWAPPED:
        full = forward
        if norm_act:
            def full(self: _BatchNorm, x: Tensor) -> Tensor:
                return self.act(self.drop(forward(self, x)))
        _SWAPPED[key] = type(f"{prefix}{base.__name__}", (base,), {
            "forward": full, "tta_norm_forward": forward, "_tta_swap": (prefix, norm_act),
            "__reduce_ex__": _reduce_swapped})
    return _SWAPPED[key]


def _reduce_swapped(module: _BatchNorm, protocol: int) -> tuple:
    # A swapped class is made at run time, so pickle (torch.save of a whole wrapped
    # model, multiprocessing) cannot find it by name: a layer pickles as its base
    # class and forward, and unpickling makes (or finds) the class again.
    cls = type(module)
    return _unpickle_swapped, (cls.__bases__[0], cls.tta_norm_forward, *cls._tta_swap), module.__getstate__()


def _unpickle_swapped(base: type, forward: Callable[[_BatchNorm, Tensor], Tensor], prefix: str,
                      norm_act: bool) -> _BatchNorm:
    """An empty layer of the swapped class (pickle then sets its state)."""
    cls = _swapped_class(base, forward, prefix, norm_act)
    return cls.__new__(cls)


#: why layers that mix in the source statistics (``bn_alpha < 1``) need running ones
MIXES_SOURCE_STATISTICS = "bn_alpha < 1 mixes in (use bn_alpha=1.0, or a model built with track_running_stats=True)"


def batchnorm_layers(model: nn.Module, types: tuple[type[nn.Module], ...] = (_BatchNorm,), *,
                     needing_running_stats: str | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the layers of ``model`` of ``types``. With
    ``needing_running_stats`` (what the caller needs them for: "which ..."), a layer
    that keeps no running statistics is refused, by name, before the caller changes
    any layer."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, types)]
    for name, module in layers if needing_running_stats else ():
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"BatchNorm layer {name!r} keeps no running statistics, which {needing_running_stats}")
    return layers


def check_bn_alpha(alpha: float, option: str = "bn_alpha", method: str | None = None) -> None:
    """The weight of the test-batch statistics must be a number in [0, 1];
    ``option`` and ``method`` name it as the user gave it (norm's ``alpha``)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{method + ': ' if method else ''}{option} must be a number in [0, 1], got {alpha!r} "
                         "(the weight of the test-batch statistics)")


def use_batch_stats(model: nn.Module, alpha: float = 1.0) -> int:
    """Make every BatchNorm layer of ``model`` normalise with test-batch statistics.

    ``alpha`` mixes them with the source running statistics (Schneider et al. 2020):
    ``alpha * batch + (1 - alpha) * source``; 1.0 is pure test statistics (Tent's
    choice), 0.0 the source model. Running statistics are never updated, so the
    model's state stays that of the source apart from the adapted parameters. The
    layers keep their class's behaviour otherwise (their class is swapped for a
    subclass, state-dict keys are unchanged). Returns the number of layers changed.
    """
    check_bn_alpha(alpha)
    layers = batchnorm_layers(model, needing_running_stats=MIXES_SOURCE_STATISTICS if alpha < 1.0 else None)
    count = 0
    for _, module in layers:
        swap_forward(module, _adaptive_bn_forward, "TestStats")
        module.tta_alpha = float(alpha)
        module.tta_sample_weight = None
        module.tta_groups = 1
        count += 1
    return count


@contextmanager
def layer_setting(models: tuple[nn.Module, ...], name: str, value: object, default: object) -> Iterator[None]:
    """Within the block, every layer of ``models`` that has the per-call setting
    ``name`` (a ``tta_*`` attribute of tta's norm layers) holds ``value``; after it,
    ``default`` again, also when the block raises."""
    layers = [m for model in models for m in model.modules() if hasattr(m, name)]
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m in layers:
            setattr(m, name, default)


@contextmanager
def sample_weighted_batch_stats(model: nn.Module, weight: Tensor) -> Iterator[None]:
    """Within the block, test-statistics BatchNorm layers compute their statistics
    from the samples with non-zero ``weight`` (shape (B,)) only: a forward on the full
    batch then equals, for those samples, a forward on the selected subset."""
    with layer_setting((model,), "tta_sample_weight", weight, None):
        yield


@contextmanager
def grouped_batch_stats(*models: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, the batch a test-statistics BatchNorm layer sees is taken
    as ``groups`` consecutive equal slices, each normalised with its own statistics:
    one forward of ``V`` stacked views of a batch then equals ``V`` forwards of one
    view each (CoTTA's teacher averages 32 views; a per-view forward is 32 calls)."""
    with layer_setting(models, "tta_groups", int(groups), 1):
        yield


def uses_test_statistics_alone(model: nn.Module) -> bool:
    """Whether some BatchNorm layer of ``model`` normalises with the batch's own
    statistics only (not mixed with the source's): a single image cannot go
    through it meaningfully (nor at all over tokens or 1x1 maps)."""
    return any(getattr(m, "tta_alpha", None) == 1.0 for m in model.modules())


def refuse_single_image_statistics(model: nn.Module, batch_size: int, method: str) -> None:
    """A batch of one image on BatchNorm layers that use test statistics alone would
    normalise the image by its own statistics: refuse it, saying what works."""
    if batch_size == 1 and uses_test_statistics_alone(model):
        raise ValueError(
            f"batch size 1 with BatchNorm test statistics: {method} would normalise the image "
            "by its own statistics. Use batches of >= 2 images (in tta-bench, also >= 2 images per "
            "domain), pass bn_alpha < 1 (e.g. bn_alpha=0.1; method.bn_alpha=0.1 in tta-bench) to "
            "mix in the source statistics, or use a GroupNorm/LayerNorm model."
        )
