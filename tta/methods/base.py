"""Shared pieces of every adaptation method.

A method is three small ideas: which parameters adapt (``select_params``), what the
loss is, and how one step runs (``forward_and_adapt``). Everything else lives here
once: entropy, norm-layer selection, batch-statistics normalisation, optimizers,
input checks, snapshot/reset, and the per-step record.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .entropy import entropy_margin, softmax_entropy
from .guard import CollapseGuard

# tta's own files and torch's (nn.Module.__call__ sits between a user and forward)
_INTERNAL_DIRS = tuple(os.path.join(d, "") for d in (os.path.dirname(os.path.dirname(__file__)),
                                                     os.path.dirname(torch.__file__)))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside tta and torch, so the
    warning names the user's line however deep in tta (subclass ``__init__``s,
    ``tta.wrap``, ``nn.Module.__call__``) it was raised."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: our caller
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

__all__ = [
    "TTAMethod",
    "StepRecord",
    "softmax_entropy",
    "select_norm_params",
    "last_stage_prefixes",
    "paper_frozen_modules",
    "frozen_top",
    "sar_paper_lr",
    "use_batch_stats",
    "sample_weighted_batch_stats",
    "build_optimizer",
    "gated_step",
    "gated_reset",
    "check_images",
    "entropy_margin",
    "NORM_LAYERS",
]

NORM_LAYERS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)

# Models currently wrapped, and by whom: a method configures its model in place
# (norm layers, requires_grad, its snapshot), so two live methods on one module
# would silently undo each other. Weak both ways: a copy or a freed method is free.
_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _refuse_if_wrapped(model: nn.Module) -> None:
    if isinstance(model, TTAMethod):
        raise TypeError(
            f"this is already a tta method ({model.method_name!r}); wrap a model, e.g. "
            f"tta.wrap(copy.deepcopy(original_model), ...), not a method"
        )
    owner = _WRAPPED.get(model)
    method = owner() if owner is not None else None
    if method is not None:
        raise ValueError(
            f"this model is already wrapped by tta method {method.method_name!r}, which has "
            "configured its norm layers and trainable parameters in place; two methods on one "
            "module would undo each other. Wrap a copy (tta.wrap(copy.deepcopy(model), ...)), "
            "or delete the first method (del it) before wrapping the model again"
        )


# ----------------------------------------------------------------------------------
# Parameter selection
# ----------------------------------------------------------------------------------


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select_norm_params(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Affine parameters (weight, bias) of every BatchNorm/LayerNorm/GroupNorm layer,
    except those inside a module whose qualified name is in ``skip`` (prefix match on
    whole name segments: ``"layer4"`` skips ``layer4.0.bn1`` but not ``layer40``)."""
    chosen = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, NORM_LAYERS) or _matches(mod_name, skip):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            if p_name in ("weight", "bias"):
                chosen.append((f"{mod_name}.{p_name}" if mod_name else p_name, param))
    return chosen


def last_stage_prefixes(model: nn.Module) -> list[str]:
    """Module names of the top of the network, which DeYO and SAR leave frozen: the
    last ``layerN`` stage of a ResNet, or the last quarter of a ViT's ``blocks`` plus
    its final norm (blocks 9-11 and ``norm`` of a 12-block ViT-B).

    Deep features are the least shifted by low-level corruptions and the most fragile
    under noisy entropy gradients, hence the papers' choice. Returns ``[]`` when the
    architecture is not recognised (then every norm layer adapts)."""
    modules = dict(model.named_modules())
    names = list(modules)
    stages: dict[str, int] = {}
    for n in names:
        m = re.search(r"(?:^|\.)layer(\d+)$", n)
        if m:
            stages[n] = int(m.group(1))
    if stages:
        top = max(stages.values())
        return sorted(n for n, i in stages.items() if i == top)
    blocks = [n for n in names if re.search(r"(^|\.)blocks\.\d+$", n)]
    if blocks:
        parent = blocks[0].rsplit("blocks.", 1)[0]
        count = len([b for b in blocks if b.startswith(parent + "blocks.")])
        first_skipped = count - max(1, count // 4)
        skipped = [f"{parent}blocks.{i}" for i in range(first_skipped, count)]
        for final in ("norm", "fc_norm"):
            if isinstance(modules.get(f"{parent}{final}"), NORM_LAYERS):
                skipped.append(f"{parent}{final}")
        return skipped
    return []


#: Substrings of the module names that SAR's and DeYO's official code freezes
#: (``collect_params``: "layer4 for ResNets and blocks9-11 for Vit-Base"), plus the
#: network's final ``norm``, matched exactly.
PAPER_FROZEN_SUBSTRINGS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def paper_frozen_modules(model: nn.Module) -> list[str]:
    """Module names that SAR's and DeYO's official code leaves frozen, applied as
    that code applies them: a module is frozen when its name (relative to the
    network, i.e. inside tta's ``backbone``) contains ``layer4``, ``blocks.9``,
    ``blocks.10`` or ``blocks.11``, or is the top-level ``norm``. What that freezes:

    - torchvision/timm ResNets (``layer1``-``layer4``): ``layer4``.
    - CIFAR ResNets (three stages, ``layer1``-``layer3``): nothing; every norm layer adapts.
    - ViT/DeiT (``blocks.N``, any depth): blocks 9, 10, 11 and the final ``norm``
      (on ViT-B the last quarter; on a 24-block ViT-L the same three middle blocks).
    - Hierarchical nets with ``stages.S.blocks.N`` / ``layers.S.blocks.N`` (ConvNeXt,
      Swin, EfficientFormer, ...): blocks 9-11 of any stage that deep, and a
      top-level ``norm`` (Swin); otherwise nothing.
    - Anything else (RegNet, MobileNet, GhostNet, ...): nothing.

    :func:`last_stage_prefixes` is the alternative rule (the deepest stage)."""
    root = "backbone." if isinstance(getattr(model, "backbone", None), nn.Module) else ""
    frozen = []
    for name, _ in model.named_modules():
        if not name.startswith(root):
            continue
        relative = name[len(root):]
        if relative == "norm" or any(part in relative for part in PAPER_FROZEN_SUBSTRINGS):
            frozen.append(name)
    return frozen


def frozen_top(model: nn.Module, freeze: str | Sequence[str]) -> list[str]:
    """The modules SAR/DeYO keep frozen: ``"paper"`` (:func:`paper_frozen_modules`),
    ``"last_stage"`` (:func:`last_stage_prefixes`), ``"none"``, or explicit names."""
    if isinstance(freeze, str):
        rules = {"paper": paper_frozen_modules, "last_stage": last_stage_prefixes, "none": lambda m: []}
        if freeze not in rules:
            raise ValueError(f"freeze must be one of {sorted(rules)} or a list of module names, got {freeze!r}")
        return rules[freeze](model)
    return list(freeze)


def uses_transformer_lr(model: nn.Module) -> bool:
    """Whether the papers' ViT learning-rate rule applies: every norm layer of the
    model is a LayerNorm (ViT, DeiT, Swin, Mixer, ConvNeXt); BatchNorm and
    GroupNorm nets (the papers' ResNet-50s) get the ResNet rule."""
    norms = [m for m in model.modules() if isinstance(m, NORM_LAYERS)]
    return bool(norms) and all(isinstance(m, nn.LayerNorm) for m in norms)


def sar_paper_lr(model: nn.Module, batch_size: int, double_at_batch_size_1: bool = True) -> float:
    """SAR's and DeYO's official learning rates (SGD, momentum 0.9): ``1e-3 * B / 64``
    for ViTs; for ResNets ``2.5e-4`` from batch 32 up and ``2.5e-4 / 64 * B * 2``
    below; doubled again at batch size 1 ("double lr for sar under bs=1")."""
    if uses_transformer_lr(model):
        lr = 1e-3 * batch_size / 64
    else:
        lr = 2.5e-4 if batch_size >= 32 else 2.5e-4 / 64 * batch_size * 2
    return 2 * lr if batch_size == 1 and double_at_batch_size_1 else lr


# ----------------------------------------------------------------------------------
# Batch-statistics normalisation
# ----------------------------------------------------------------------------------


def _weighted_stats(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
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


def _adaptive_bn_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    alpha: float = self.tta_alpha
    weight: Tensor | None = self.tta_sample_weight
    if weight is None and alpha == 0.0:
        # The source statistics alone: exactly eval-mode BatchNorm.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    if weight is None and alpha == 1.0 and torch.is_grad_enabled():
        # Native train-mode BatchNorm: its fused backward is the fastest path.
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    if weight is None:
        weight = torch.ones(x.shape[0], device=x.device)
    elif weight.shape[0] != x.shape[0]:
        # BatchNorm over tokens (LeViT's BatchNorm1d on (B, N, C).flatten(0, 1)): each
        # image owns x.shape[0] / B consecutive rows.
        if x.shape[0] % weight.shape[0]:
            raise ValueError(
                f"{type(self).__name__} sees {x.shape[0]} rows for a batch of {weight.shape[0]} "
                "images, which is no whole number per image: per-sample statistics are undefined"
            )
        weight = weight.repeat_interleave(x.shape[0] // weight.shape[0])
    # With a weight: statistics of the selected samples only, as if the batch were
    # that subset, without a host sync to gather them.
    mean, var = _weighted_stats(x, weight)
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
    return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


_ADAPTIVE_CLASSES: dict[type, type] = {}


def use_batch_stats(model: nn.Module, alpha: float = 1.0) -> int:
    """Make every BatchNorm layer of ``model`` normalise with test-batch statistics.

    ``alpha`` mixes them with the source running statistics (Schneider et al. 2020):
    ``alpha * batch + (1 - alpha) * source``; 1.0 is pure test statistics (Tent's
    choice), 0.0 the source model. Running statistics are never updated, so the
    model's state stays that of the source apart from the adapted parameters. The
    layers keep their class's behaviour otherwise (their class is swapped for a
    subclass, state-dict keys are unchanged). Returns the number of layers changed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"bn alpha must be in [0, 1], got {alpha}")
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            base = type(module)
            if base not in _ADAPTIVE_CLASSES.values():
                if base not in _ADAPTIVE_CLASSES:
                    _ADAPTIVE_CLASSES[base] = type(
                        f"TestStats{base.__name__}", (base,), {"forward": _adaptive_bn_forward}
                    )
                module.__class__ = _ADAPTIVE_CLASSES[base]
            if alpha < 1.0 and module.running_mean is None:
                raise ValueError("bn alpha < 1 needs BatchNorm layers with running statistics")
            module.tta_alpha = float(alpha)
            module.tta_sample_weight = None
            count += 1
    return count


@contextmanager
def sample_weighted_batch_stats(model: nn.Module, weight: Tensor) -> Iterator[None]:
    """Within the block, test-statistics BatchNorm layers compute their statistics
    from the samples with non-zero ``weight`` (shape (B,)) only: a forward on the full
    batch then equals, for those samples, a forward on the selected subset."""
    layers = [m for m in model.modules() if hasattr(m, "tta_sample_weight")]
    for m in layers:
        m.tta_sample_weight = weight
    try:
        yield
    finally:
        for m in layers:
            m.tta_sample_weight = None


def _uses_pure_batch_stats(model: nn.Module) -> bool:
    return any(getattr(m, "tta_alpha", None) == 1.0 for m in model.modules())


# ----------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------


def build_optimizer(
    params: Sequence[nn.Parameter],
    optimizer: str = "sgd",
    lr: float = 2.5e-4,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam/AdamW over ``params``, validated."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if momentum < 0 or weight_decay < 0:
        raise ValueError("momentum and weight_decay must be >= 0")
    name = optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[dict, str, Tensor]]:
    return [
        (state, key, value)
        for state in optimizer.state.values()
        for key, value in state.items()
        if isinstance(value, Tensor)
    ]


@torch.no_grad()
def gated_step(
    optimizer: torch.optim.Optimizer, enabled: Tensor, step_fn: Callable[[], Any] | None = None
) -> None:
    """``optimizer.step()`` that takes effect only if the 0-dim bool ``enabled`` holds.

    Methods that filter samples skip the update when nothing passes the filter (the
    papers' ``if len(selected) > 0``). Deciding that on the host would stall the
    device every step, so the step always runs and is undone with ``torch.where``;
    the adapted parameters are only norm affines, so the copies are tiny.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    state_before = {(id(s), k): v.clone() for s, k, v in _state_tensors(optimizer)}
    (step_fn or optimizer.step)()
    for p, old in zip(params, before):
        p.copy_(torch.where(enabled.to(p.device), p, old))
    for state, key, value in _state_tensors(optimizer):
        # State created by this very step reverts to zeros: the same as no state for
        # SGD momentum and Adam moments/step count.
        old = state_before.get((id(state), key), torch.zeros_like(value))
        state[key] = torch.where(enabled.to(value.device), value, old)


@torch.no_grad()
def gated_reset(
    params: Sequence[Tensor],
    source: Sequence[Tensor],
    optimizer: torch.optim.Optimizer | None,
    enabled: Tensor,
) -> None:
    """Restore ``params`` to ``source`` and clear the optimizer state where the 0-dim
    bool ``enabled`` holds, without a host sync (SAR's model recovery)."""
    for p, p0 in zip(params, source):
        p.copy_(torch.where(enabled.to(p.device), p0, p))
    if optimizer is not None:
        for state, key, value in _state_tensors(optimizer):
            state[key] = torch.where(enabled.to(value.device), torch.zeros_like(value), value)


# ----------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------


def check_images(x: Any) -> None:
    """Reject what a model in pixel space cannot take, with advice. One host sync."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected float images in [0, 1], got dtype {x.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        hint = {1: " (grayscale: use x.expand(-1, 3, -1, -1))", 4: " (RGBA: drop alpha, x[:, :3])"}
        raise ValueError(
            f"expected 3 RGB channels, got {x.shape[1]}{hint.get(x.shape[1], '')}"
        )
    if x.shape[0] == 0:
        raise ValueError("empty batch: nothing to predict or adapt on")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"expected images of at least 1x1 pixels, got shape {tuple(x.shape)}")
    finite, lo, hi = torch.stack(
        [torch.isfinite(x).all().to(x.dtype), x.amin(), x.amax()]
    ).tolist()
    if not finite:
        raise ValueError("images contain NaN or inf pixels; the batch was not used")
    if lo < -1e-4 or hi > 1 + 1e-4:
        advice = " (looks like 0-255 pixels: divide by 255)" if hi > 2 else ""
        raise ValueError(
            f"expected pixels in [0, 1], got range [{lo:.3g}, {hi:.3g}]{advice}; "
            "tta models normalise internally, pass un-normalised RGB"
        )


# ----------------------------------------------------------------------------------
# The method base class
# ----------------------------------------------------------------------------------


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (what inputs are cast to)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _clone_all(tensors: list[Tensor]) -> list[Tensor]:
    # One fused kernel per dtype and device on CUDA instead of a launch per tensor.
    if tensors and all(t.is_floating_point() for t in tensors) and len({t.device for t in tensors}) == 1:
        return list(torch._foreach_mul(tensors, 1.0))
    return [t.clone() for t in tensors]


def _few(keys: Sequence[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(map(repr, keys[:n])) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: Any, type_name: str | None, method: str
) -> None:
    """The optimizer state must be of this optimizer's kind, over the same parameters."""
    mine = type(optimizer).__name__
    fail = f"{method}: the optimizer state is not this method's {mine} over its adapted parameters"
    if type_name is not None and type_name != mine:
        raise ValueError(f"{fail}: it is a {type_name}'s. Nothing was loaded")
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{fail} (parameter groups differ). Nothing was loaded")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for theirs, own in zip(groups, optimizer.param_groups):
        if len(theirs.get("params", ())) != len(own["params"]):
            raise ValueError(f"{fail}: {len(theirs.get('params', ()))} parameters in the state, "
                             f"{len(own['params'])} here. Nothing was loaded")
        if set(theirs) != set(own):
            raise ValueError(f"{fail}: its settings are {sorted(set(theirs) - {'params'})}, a "
                             f"{mine}'s are {sorted(set(own) - {'params'})}. Nothing was loaded")
    for index, entry in (state.get("state") or {}).items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"{fail}: state for parameter {index!r} of {len(params)}. Nothing was loaded")
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"{fail}: {key} of parameter {index} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(params[index].shape)}. Nothing was loaded")


class StepUndo:
    """What one ``forward`` may change, copied before it, so that a call that raises
    (out of memory, ``KeyboardInterrupt``, a failing hook, between SAR's two passes)
    leaves the method exactly as it was: the adapted parameters (and their
    gradients), every buffer of the method and its model (buffers are often
    reassigned rather than written, so they are restored by name), the optimizer
    state, the collapse guard and the gradient scaler. For norm-affine methods this
    is a few kilobytes; no host sync."""

    def __init__(self, method: "TTAMethod") -> None:
        self.method = method
        self.params = [p for _, p in method.adapted]
        with torch.no_grad():
            self.param_values = _clone_all([p.detach() for p in self.params])
        self.buffers = [(m, name, b) for m in method.modules() for name, b in m._buffers.items()]
        live = [b for _, _, b in self.buffers if b is not None]
        copies = iter(_clone_all(live) if live else [])
        self.buffer_values = [next(copies) if b is not None else None for _, _, b in self.buffers]
        opt = method.optimizer
        self.optimizer_state = None if opt is None else {
            p: {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()}
            for p, st in opt.state.items()
        }
        self.guard = method.guard.state_dict() if method.guard is not None else None
        self.scaler = method.scaler.state_dict() if method.scaler is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        method = self.method
        for p, value in zip(self.params, self.param_values):
            p.copy_(value)
            p.grad = None
        for (module, name, _), value in zip(self.buffers, self.buffer_values):
            module._buffers[name] = value
        if self.optimizer_state is not None:
            method.optimizer.state.clear()
            method.optimizer.state.update(self.optimizer_state)
        if self.guard is not None:
            method.guard.load_state_dict(self.guard)
        if self.scaler is not None:
            method.scaler.load_state_dict(self.scaler)



@dataclass
class StepRecord:
    """What one adaptation step did. Tensor fields stay on the device until read
    through :meth:`to_dict`, so recording costs no sync."""

    num_samples: int
    num_selected: Tensor | int | None = None
    loss: Tensor | float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int | None]:
        def plain(v: Any) -> Any:
            return v.item() if isinstance(v, Tensor) else v

        out = {"num_samples": self.num_samples, "num_selected": plain(self.num_selected)}
        out["loss"] = plain(self.loss)
        out.update({k: plain(v) for k, v in self.extra.items()})
        return out


class TTAMethod(nn.Module):
    """Base class: wraps ``model``; ``forward(x)`` predicts on ``x`` and adapts on it.

    Subclasses set which parameters adapt (``select_params``) and implement one
    adaptation step (``forward_and_adapt``). The wrapped model is changed in place
    (norm layers switch to test statistics, ``requires_grad`` is set on the adapted
    parameters only); wrap a ``copy.deepcopy`` to keep the original.

    Args:
        model: classifier taking float RGB in [0, 1], returning (B, C) logits.
        steps: adaptation steps per batch (prediction comes from the last one).
        episodic: reset to the source state before every batch.
        optimizer, lr, momentum, weight_decay, betas: the optimizer of the adapted
            parameters (see :func:`build_optimizer`).
        bn_alpha: weight of test-batch statistics in BatchNorm layers (1.0: test
            statistics only; below 1 mixes in the source statistics, which also
            makes batch size 1 usable).
        check_inputs: validate each batch (dtype, shape, finite, in [0, 1]) before
            using it; costs one host sync per batch.
        amp: mixed precision for the forward passes: ``"bf16"`` or ``"fp16"`` (with
            a gradient scaler; CUDA only), ``None`` for full precision. Losses are
            computed in float32 either way.
        channels_last: run the model in channels-last memory format (faster
            convolutions on recent GPUs and on CPUs with oneDNN).
        compile: ``torch.compile`` the model's forward (``True`` or a backend name).
            If compilation fails, tta warns and runs eagerly.
        collapse_guard: watch for collapse and reset to the source when it happens,
            and report the source model's predictions while test statistics mislead
            (``True``, or a dict of :class:`~tta.methods.guard.CollapseGuard`
            settings). Gradient methods only; costs one or two forwards of a frozen
            source copy per check.
    """

    #: set by ``@register_method``
    method_name: str = ""
    #: whether the BatchNorm layers use test-batch statistics
    batch_stats: bool = True
    #: whether the method has an optimizer (``source`` and ``norm`` do not)
    has_optimizer: bool = True
    #: base options only a method with an optimizer uses; :func:`tta.method_defaults`
    #: and ``tta.wrap`` leave them out for the others
    optimizer_options: tuple[str, ...] = ("steps", "episodic", "optimizer", "lr", "momentum",
                                          "weight_decay", "betas", "collapse_guard")
    #: base options only a method with test-batch statistics uses
    batch_stats_options: tuple[str, ...] = ("bn_alpha",)
    #: published per-dataset settings, ``tta.wrap(model, name, preset="cifar10")``
    presets: dict[str, dict[str, Any]] = {"cifar10": {}, "imagenet": {}}

    @classmethod
    def unused_options(cls) -> tuple[str, ...]:
        """The base class's options this method has no use for (not offered by
        :func:`tta.method_defaults`, refused by ``tta.wrap``)."""
        return ((() if cls.has_optimizer else cls.optimizer_options)
                + (() if cls.batch_stats else cls.batch_stats_options))

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 1,
        episodic: bool = False,
        optimizer: str = "sgd",
        lr: float | str = 2.5e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        bn_alpha: float = 1.0,
        check_inputs: bool = True,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        collapse_guard: "bool | dict | CollapseGuard" = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module to wrap, got {type(model).__name__}")
        _refuse_if_wrapped(model)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.model = model
        self.steps = steps
        self.episodic = episodic
        self.bn_alpha = bn_alpha
        self.check_inputs = check_inputs
        self.last_record: StepRecord | None = None
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self.channels_last = channels_last
        self.scaler: torch.amp.GradScaler | None = None
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.compiled = bool(compile)
        if compile:
            model.compile(**({"backend": compile} if isinstance(compile, str) else {}))

        model.eval()  # dropout off; norm layers are configured explicitly below
        switched = use_batch_stats(model, alpha=bn_alpha) if self.batch_stats else None
        if switched == 0 and not self.has_optimizer:
            # GroupNorm/LayerNorm models have no batch statistics to adapt: say so
            # rather than report source-model numbers under this method's name
            warn_at_caller(f"{self.method_name or type(self).__name__}: the model has no BatchNorm layer, "
                           "so there are no statistics to adapt and it predicts as the source model")
        model.requires_grad_(False)
        self.adapted = self.select_params() if self.has_optimizer else []
        if self.has_optimizer and not self.adapted:
            raise ValueError(self._nothing_to_adapt_message())
        for _, p in self.adapted:
            p.requires_grad_(True)
        self._lr_rule: str | None = None
        if isinstance(lr, str):
            if lr != "paper":
                raise ValueError(f"lr must be a positive number or 'paper', got {lr!r}")
            if type(self).paper_lr is TTAMethod.paper_lr:
                raise ValueError(f"{self.method_name or type(self).__name__} has no published "
                                 "learning-rate rule (lr='paper'); give lr as a number")
            # Resolved on the first batch, when the batch size is known.
            self._lr_rule, lr = lr, self.paper_lr(64)
        self.lr = lr
        self.optimizer: torch.optim.Optimizer | None = None
        if self.adapted:
            self.optimizer = build_optimizer(
                [p for _, p in self.adapted], optimizer, lr, momentum, weight_decay, betas
            )
        if amp == "fp16" and self.optimizer is not None:
            self.scaler = torch.amp.GradScaler("cuda")
        self.guard = CollapseGuard.from_option(collapse_guard)
        if self.guard is not None:
            if self.optimizer is None:
                raise ValueError(f"collapse_guard needs a gradient method, not {self.method_name!r}")
            self.guard.attach(model)
        self._source_state: dict[str, Any] | None = None
        _WRAPPED[model] = weakref.ref(self)

    def _nothing_to_adapt_message(self) -> str:
        name = self.method_name or type(self).__name__
        has_norm = any(isinstance(m, NORM_LAYERS) for m in self.model.modules())
        if has_norm:
            why = ("every norm layer of the model is frozen by this method's choice of layers; "
                   "pass skip_modules='none' to adapt them all")
        else:
            why = ("the model has no BatchNorm, LayerNorm or GroupNorm layer with affine "
                   "parameters (a norm-free net such as timm's nf_* and normfree models, or a "
                   "plain conv net), and those are what it adapts")
        return (f"{name}: nothing to adapt: {why}. On such a model use method 'source' "
                "(no adaptation), or choose a model with norm layers")

    # -- the three ideas -------------------------------------------------------------
    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        """Which parameters adapt. Default: every norm layer's affine parameters."""
        return select_norm_params(self.model)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        """One step on batch ``x``: return the logits to report and a record."""
        raise NotImplementedError

    # -- the common loop -------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Predict on ``x`` (float RGB in [0, 1], NCHW) and adapt on it.

        Adapts also when called under ``torch.no_grad()`` or ``torch.inference_mode()``
        (how models are usually evaluated): the step runs with gradients enabled.
        Inputs of another floating dtype are cast to the model's. If the step raises
        (out of memory, ``KeyboardInterrupt``, a failing hook), the method's state is
        left as it was before the call."""
        if self.check_inputs:
            check_images(x)
        with torch.inference_mode(False), torch.enable_grad():
            # Inference tensors cannot be saved for backward: adapt on a normal copy.
            x = x.clone() if x.is_inference() else x
            dtype = _floating_dtype(self.model)
            if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.batch_stats and x.shape[0] == 1 and _uses_pure_batch_stats(self.model):
            raise ValueError(
                f"batch size 1 with BatchNorm test statistics: {self.method_name or 'this method'} "
                "would normalise each image by its own statistics. Use batches of >= 2 "
                "images, pass bn_alpha < 1 (e.g. 0.1) to mix in the source statistics, "
                "or use a GroupNorm/LayerNorm model."
            )
        if self.amp == "fp16" and x.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' on the CPU")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # The first accepted batch fixes lr="paper" (before the snapshot, which keeps it).
        self._resolve_lr(x.shape[0])
        if self._source_state is None:
            self.snapshot()
        undo = StepUndo(self)
        try:
            if self.episodic:
                self.reset()
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                for _ in range(self.steps):
                    logits, record = self._run_step(x)
            logits = logits.float()
            if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the model must return (B, num_classes) logits, got shape {tuple(logits.shape)}"
                )
            fallback = None
            if self.guard is not None:
                collapsed, fallback = self.guard.check(x, logits)
                if collapsed:
                    self.reset()
        except BaseException:
            undo.restore()
            raise
        record.extra["num_collapses"] = self.guard.num_collapses if self.guard is not None else 0
        record.extra["guard_fallback"] = fallback is not None
        self.last_record = record
        return logits if fallback is None else fallback

    def _run_step(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        if not self.compiled:
            return self.forward_and_adapt(x)
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self.forward_and_adapt(x)
        except TorchDynamoException as err:
            # Compilation fails before anything is updated (the first forward of
            # the step is where it happens), so running eagerly loses nothing.
            warn_at_caller(f"torch.compile failed ({type(err).__name__}); running eagerly")
            self.model._compiled_call_impl = None
            self.compiled = False
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            return self.forward_and_adapt(x)

    def paper_lr(self, batch_size: int) -> float:
        """The learning rate the method's paper uses at ``batch_size`` (``lr="paper"``);
        methods with a published rule override this."""
        raise NotImplementedError

    def _resolve_lr(self, batch_size: int) -> None:
        if self._lr_rule is None or self.optimizer is None:
            return
        self.lr = self.paper_lr(batch_size)
        groups = list(self.optimizer.param_groups)
        if self._source_state is not None:  # snapshot taken before the first batch
            groups += self._source_state.get("_extra_state", {}).get("optimizer", {}).get("param_groups", [])
        for group in groups:
            group["lr"] = self.lr
        self._lr_rule = None

    # -- shared step pieces ------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled when training in float16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, enabled: Tensor | None = None) -> None:
        """Optimizer step (skipped without a host sync where the 0-dim bool
        ``enabled`` is False, see :func:`gated_step`), then clear the gradients."""
        step_fn = (lambda: self.scaler.step(self.optimizer)) if self.scaler is not None else self.optimizer.step
        if enabled is None:
            step_fn()
        else:
            gated_step(self.optimizer, enabled, step_fn)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "method": self.method_name,
            "optimizer_type": type(self.optimizer).__name__ if self.optimizer else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an adapted state (resuming a stream). The source state that
        :meth:`reset` returns to stays the wrapped model's own, even when this is
        called before the first batch."""
        if self._source_state is None:
            self.snapshot()
        self._check_loadable(state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_loadable(self, state_dict: Mapping[str, Any], strict: bool) -> None:
        """Refuse, before anything changes, a state that is not this method's: from
        another method, model or optimizer (``nn.Module.load_state_dict`` copies what
        matches before it reports what does not)."""
        name = self.method_name or type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{name}: expected a state dict (a mapping), got {type(state_dict).__name__}")
        own = self.state_dict()
        extra = state_dict.get("_extra_state")
        extra = extra if isinstance(extra, Mapping) else {}
        theirs = extra.get("method")
        if theirs is not None and theirs != self.method_name:
            raise ValueError(f"{name}: this state is from method {theirs!r}; load it into a "
                             f"tta.wrap(model, {theirs!r}). Nothing was loaded")
        if strict:
            missing = sorted(own.keys() - state_dict.keys())
            unexpected = sorted(state_dict.keys() - own.keys())
            if missing or unexpected:
                raise ValueError(
                    f"{name}: the state does not match this method and model (missing keys: "
                    f"{_few(missing)}; unexpected keys: {_few(unexpected)}): it is from another "
                    "model or method. Nothing was loaded"
                )
        for key, value in state_dict.items():
            mine = own.get(key)
            if (isinstance(value, Tensor) and isinstance(mine, Tensor) and value.shape != mine.shape
                    and key not in self._buffers):  # the method's own buffers take the stored shape
                raise ValueError(f"{name}: {key!r} has shape {tuple(value.shape)} in the state but "
                                 f"{tuple(mine.shape)} here: it is from another model. Nothing was loaded")
        if self.optimizer is not None and extra.get("optimizer") is not None:
            _check_optimizer_state(self.optimizer, extra["optimizer"], extra.get("optimizer_type"), name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Method buffers may change shape once the class count is known (a running
        # mean prediction starts as a scalar NaN): take the stored shape.
        for name, buf in self._buffers.items():
            stored = state_dict.get(prefix + name)
            if buf is not None and stored is not None and stored.shape != buf.shape:
                self._buffers[name] = torch.empty_like(stored, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def snapshot(self) -> None:
        """Record the current state as the one :meth:`reset` returns to. Taken
        automatically before the first batch."""
        self._source_state = copy.deepcopy(self.state_dict())

    def reset(self) -> None:
        """Return model, optimizer and method state to the source, bit-exact."""
        if self._source_state is None:
            self.snapshot()
            return
        # The guard's counts outlive resets (they are what results report); its
        # window starts afresh.
        guard = self.guard
        counts = (guard.num_collapses, guard.num_fallback_batches) if guard is not None else None
        # The snapshot is this method's own state: no need to check it.
        nn.Module.load_state_dict(self, self._source_state)
        if guard is not None:
            guard.num_collapses, guard.num_fallback_batches = counts
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> "TTAMethod":
        # The wrapped model's modes are part of the method's configuration: keep them.
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, adapted_params={len(self.adapted)}"
