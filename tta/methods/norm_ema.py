"""``norm_ema``: BatchNorm on test statistics averaged across batches (BN-EMA;
Schneider et al., NeurIPS 2020, bethgelab/robustness ``EMABatchNorm``; the
continual-TTA benchmark of mariodoebler/test-time-adaptation, ``BNEMA``).

No parameter adapts. Every BatchNorm layer keeps its running statistics moving
toward the test batches by an exponential moving average, starting from the source
statistics, and normalises with them: the current batch weighs ``momentum``, the
one before ``momentum * (1 - momentum)``, ..., the source ``(1 - momentum)^t``
after t batches. Unlike ``norm`` it works at batch size 1: an image's statistics
enter a running average, they do not replace the source ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._warn import warn_at_caller
from .base import TTAMethod
from .norm_layers import batchnorm_layers, layer_setting, swap_forward
from .records import StepRecord
from .registry import register_method

__all__ = ["NormEMA", "use_ema_stats", "ema_stats_mode"]

#: What an EMA layer does in a forward: ``"update"`` moves its running statistics
#: toward the input's, then normalises with them (tta's one pass); ``"batch"`` moves
#: them and normalises with the batch's own (the first of the port's two passes,
#: train mode); ``"eval"`` normalises with them and changes nothing.
MODES = ("update", "batch", "eval")


@torch.no_grad()
def _ema_update_(layer: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Move ``layer``'s running statistics toward those of ``x`` as train-mode
    BatchNorm does (unbiased variance, ``num_batches_tracked`` + 1); returns the
    batch's mean and biased variance, or ``None`` (nothing moved) where each channel
    holds a single value (BatchNorm1d on one image: no variance to estimate)."""
    n = x.numel() // x.shape[1]
    if n < 2:
        return None
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    layer.num_batches_tracked.add_(1)
    dtype = layer.running_mean.dtype
    # momentum None: the cumulative average, 1/t for the t-th batch (PyTorch's rule).
    weight = (1.0 / layer.num_batches_tracked.to(dtype)) if layer.tta_momentum is None else layer.tta_momentum
    layer.running_mean.lerp_(mean.to(dtype), weight)
    layer.running_var.lerp_((var * (n / (n - 1))).to(dtype), weight)
    return mean, var


def _ema_bn_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    mode = self.tta_mode
    stats = _ema_update_(self, x) if mode != "eval" else None
    if mode == "batch" and stats is not None:
        mean, var = stats
        mean, var = mean.to(self.running_mean.dtype), var.to(self.running_var.dtype)
    else:
        mean, var = self.running_mean, self.running_var
    return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def _check_momentum(momentum: float | None) -> None:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 < momentum <= 1.0):
        raise ValueError(f"stats_momentum must be in (0, 1] or None (the cumulative average), got {momentum!r}")


def use_ema_stats(model: nn.Module, momentum: float | None = 0.1) -> int:
    """Make every BatchNorm layer of ``model`` an EMA layer (in ``"eval"`` mode
    until :func:`ema_stats_mode` says otherwise): its running statistics move toward
    each input's by ``momentum`` (``None``: the cumulative average of the inputs,
    the source statistics discarded: running mean 0, variance 1, count 0, as
    bethgelab's ``EMABatchNorm`` starts). The layers keep their class's behaviour
    otherwise (their class is swapped for a subclass; state-dict keys are unchanged).
    Returns the number of layers changed."""
    _check_momentum(momentum)
    layers = batchnorm_layers(model)
    for name, module in layers:  # all checked before anything changes
        if module.running_mean is None or module.running_var is None or module.num_batches_tracked is None:
            raise ValueError(f"BatchNorm layer {name!r} keeps no running statistics to average (built with "
                             "track_running_stats=False); method 'norm' normalises with each batch's own")
    count = 0
    for _, module in layers:
        swap_forward(module, _ema_bn_forward, "EMAStats")
        module.tta_momentum = None if momentum is None else float(momentum)
        module.tta_mode = "eval"
        if momentum is None:
            with torch.no_grad():
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
        count += 1
    return count


@contextmanager
def ema_stats_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block, the EMA layers of ``model`` run in ``mode`` (:data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with layer_setting((model,), "tta_mode", mode, "eval"):
        yield


@register_method("norm_ema")
class NormEMA(TTAMethod):
    """BN-EMA: BatchNorm normalises with running statistics that follow the test
    batches by an exponential moving average, from the source statistics; no
    parameter is trained. The state (the running statistics, in the model's buffers)
    carries over from batch to batch; ``reset()`` returns to the source ones.

    One pass per batch by default: each BatchNorm layer moves its running statistics
    toward its input's and normalises the input with the moved ones, within one
    forward. The port (mariodoebler/test-time-adaptation ``BNEMA``) runs two: a
    train-mode forward whose output it discards (every layer normalised with the
    batch's own statistics while updating its running ones), then an eval-mode
    forward with the updated statistics. Both weigh the current batch ``momentum``
    in every layer's statistics; they differ in the activations a deep layer
    averages: the port's come from earlier layers normalised by batch statistics,
    the one pass's from the same EMA-normalised activations that layer then
    normalises (bethgelab's official ``EMABatchNorm`` does the same per layer). The
    one pass costs half the forwards and its statistics match the activations they
    normalise; ``two_pass=True`` reproduces the port.

    Args:
        stats_momentum: weight of each new batch in the running statistics (the
            port's: each layer's own PyTorch ``momentum``, 0.1 in the CIFAR and
            ImageNet models it ran). ``None``: bethgelab's official rule, the
            cumulative average of all test batches seen, every batch equal, the
            source statistics discarded.
        two_pass: the port's two forwards per batch (see above).

    Presets: ``"cifar10"`` and ``"imagenet"`` are these defaults
    (cfgs/{cifar10_c,imagenet_c}/norm_ema.yaml set no method option; batch 200 and
    64 there).
    """

    batch_stats = False
    has_optimizer = False
    presets = {"cifar10": {}, "imagenet": {}}

    def __init__(self, model: nn.Module, *, stats_momentum: float | None = 0.1, two_pass: bool = False,
                 **kwargs) -> None:
        # Checked before the base class configures the model in place.
        _check_momentum(stats_momentum)
        super().__init__(model, **kwargs)
        self.stats_momentum, self.two_pass = stats_momentum, two_pass
        if use_ema_stats(self.model, stats_momentum) == 0:
            warn_at_caller("norm_ema: the model has no BatchNorm layer, so there are no statistics to "
                           "average and it predicts as the source model")

    @torch.no_grad()
    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        if self.two_pass:
            with ema_stats_mode(self.model, "batch"):
                self.model(x)
            logits = self.model(x)
        else:
            with ema_stats_mode(self.model, "update"):
                logits = self.model(x)
        return logits, StepRecord(num_samples=x.shape[0], num_selected=x.shape[0])
