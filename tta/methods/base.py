"""The method base class: :class:`TTAMethod` and the per-step :class:`StepRecord`.

A method is three small ideas: which parameters adapt (``select_params``), what the
loss is, and how one step runs (``forward_and_adapt``). The shared pieces live in
modules named for what they hold: :mod:`.entropy`, :mod:`.params` (which parameters
adapt), :mod:`.norm_layers` (test-batch statistics), :mod:`.optim` (optimizers,
gated steps, the undo of a failed step), :mod:`.inputs` (input checks); this module
re-exports them for ``from tta.methods.base import ...``.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .entropy import entropy_margin, softmax_entropy
from .guard import CollapseGuard
from .inputs import check_images
from .norm_layers import NORM_LAYERS, _uses_pure_batch_stats, sample_weighted_batch_stats, use_batch_stats
from .optim import StepUndo, _check_optimizer_state, _few, build_optimizer, gated_reset, gated_step
from .params import (
    frozen_top,
    last_stage_prefixes,
    paper_frozen_modules,
    sar_paper_lr,
    select_norm_params,
)

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
# The method base class
# ----------------------------------------------------------------------------------


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (what inputs are cast to)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


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
