"""The method base class :class:`TTAMethod`: the loop every method shares (input
checks, test-batch statistics, mixed precision, the undo of a failed step, the
collapse guard) and its state (``snapshot`` / ``reset`` / ``state_dict``).

A method is three small ideas: which parameters adapt (``select_params``), what the
loss is, and how one step runs (``forward_and_adapt``). The pieces methods share
live in modules named for what they hold: :mod:`.entropy`, :mod:`.params` (which
parameters adapt), :mod:`.norm_layers` (test-batch statistics), :mod:`.optim`
(optimizers, gated steps, SAM, the undo of a failed step), :mod:`.records` (what a
step reports), :mod:`.state` (checks of a state before loading), :mod:`.inputs`.

This module is over 350 lines for one reason: :class:`TTAMethod` is the one class
every method extends, and its options (documented in full in its docstring), the
loop and the state they govern are kept in one place so that a method's author reads
one file to know what ``forward`` does around ``forward_and_adapt``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_positive_int
from .._host_memory import keep_freed_host_memory
from .._warn import warn_at_caller
from .entropy import entropy_margin
from .guard import CollapseGuard
from .inputs import check_images, floating_dtype, mark_wrapped, refuse_if_wrapped, refuse_inference_weights
from .norm_layers import refuse_single_image_statistics, use_batch_stats
from .optim import StepUndo, adam_on_float16_message, build_optimizer, gated_step
from .params import frozen_top, nothing_to_adapt_message, select_norm_params
from .records import StepRecord
from .state import check_loadable, is_placeholder

__all__ = ["TTAMethod"]


def uncache_attention_biases(model: nn.Module) -> int:
    """Make timm's eval-mode attention-bias caches (LeViT, EfficientFormer(V2),
    EfficientViT-MSRA: each attention layer indexes its bias table once and keeps
    the result) recompute at every forward. Adaptation changes those tables (methods
    that adapt every weight, teachers following the student, resets, stochastic
    restores): a cached result would be stale and would hold an autograd graph
    that the first backward frees. Returns how many layers it found."""
    found = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict) and not getattr(
                module, "_tta_uncached", False):
            module.register_forward_pre_hook(_clear_attention_bias_cache)
            module._tta_uncached = True
            found += 1
    return found


def _clear_attention_bias_cache(module: nn.Module, args: tuple) -> None:
    module.attention_bias_cache.clear()


def _refuse_non_tensor_output(module: nn.Module, args: tuple, output: Any) -> None:
    if not isinstance(output, Tensor):
        keys = f" (keys {', '.join(map(repr, output))})" if isinstance(output, Mapping) else ""
        raise TypeError(
            f"tta methods need a model that returns its logits, a (B, num_classes) tensor; "
            f"{type(module).__name__} returned a {type(output).__name__}{keys}: wrap it in a module whose "
            "forward returns the logits (e.g. the output's ['logits'] or [0])")


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
        optimizer: optimizer of the adapted parameters: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate, or ``"paper"`` for the method's published rule (by batch
            size and model), fixed on the first batch.
        momentum: SGD momentum.
        weight_decay: weight decay.
        betas: Adam/AdamW betas.
        nesterov: Nesterov momentum for SGD.
        skip_modules: norm layers that stay frozen: ``"none"``, ``"paper"`` (the
            modules SAR's and DeYO's official code freezes, see
            :func:`~tta.methods.params.paper_frozen_modules`), ``"last_stage"`` (the
            deepest stage, :func:`~tta.methods.params.last_stage_prefixes`), or a list
            of module names.
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
            A backend torch does not know is refused when wrapping; if compiling
            fails at the first step, tta warns and runs eagerly.
        reset_every: return to the source state after every this many updates
            (RDumb's rule, Press et al. 2023; ``None``: never). Updates are the
            ``steps`` on each batch, so with ``steps > 1`` the reset may fall
            mid-batch (TPT, RLCF and TTRV, which run their own rounds within a
            batch, count one per batch). The count lives in the state, so a resumed
            stream resets where an uninterrupted one would.
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
    #: whether ``select_params`` picks norm layers' affine parameters (which
    #: ``skip_modules`` filters); methods that choose their own set this False
    adapts_norm_params: bool = True
    #: base options only a method with an optimizer uses; :func:`tta.method_defaults`
    #: and ``tta.wrap`` leave them out for the others
    optimizer_options: tuple[str, ...] = ("steps", "episodic", "optimizer", "lr", "momentum",
                                          "weight_decay", "betas", "nesterov", "skip_modules", "reset_every",
                                          "collapse_guard")
    #: base options only a method with test-batch statistics uses
    batch_stats_options: tuple[str, ...] = ("bn_alpha",)
    #: published per-dataset settings, ``tta.wrap(model, name, preset="cifar10")``
    presets: dict[str, dict[str, Any]] = {"cifar10": {}, "imagenet": {}}
    #: the entropy margins a ``None`` option stands for, as fractions of ln C (the
    #: papers state them so, so that one default serves 10 and 1000 classes); the
    #: method configs' comments are generated from these
    margin_fractions: dict[str, float] = {}
    #: the record type of a step (its fields are the columns of a run's summary)
    record_type: type[StepRecord] = StepRecord
    #: attribute names of the model copies a step changes besides the adapted
    #: parameters (a mean teacher): a step that raises restores them too
    updated_copies: tuple[str, ...] = ()
    #: whether the constructor trains the model (a warm-up): ``tta.wrap`` then keeps
    #: a copy of its values, to put back if the wrap is refused
    trains_while_built: bool = False
    #: the options a state means something under, as ``tta.wrap`` resolved them (set
    #: by it): saved with the state, which a method with other values refuses to load
    state_options: dict[str, Any] = {}

    @classmethod
    def unused_options(cls) -> dict[str, str]:
        """The base class's options this method has no use for, each with the reason
        (not offered by :func:`tta.method_defaults`, refused by ``tta.wrap``)."""
        unused = {}
        if not cls.adapts_norm_params:
            unused["skip_modules"] = "chooses its own parameters, not norm layers"
        if not cls.batch_stats:
            unused.update(dict.fromkeys(cls.batch_stats_options, "does not use test-batch statistics"))
        if not cls.has_optimizer:
            unused.update(dict.fromkeys(cls.optimizer_options, "takes no gradient steps"))
        return unused

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
        nesterov: bool = False,
        skip_modules: str | list[str] = "none",
        bn_alpha: float = 1.0,
        check_inputs: bool = True,
        amp: str | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        reset_every: int | None = None,
        collapse_guard: "bool | dict | CollapseGuard" = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module to wrap, got {type(model).__name__}")
        refuse_if_wrapped(model)
        if self.has_optimizer:
            refuse_inference_weights(model, self.method_name or type(self).__name__)
        for option, value in (("episodic", episodic), ("nesterov", nesterov), ("check_inputs", check_inputs),
                              ("channels_last", channels_last)):
            # A string from a config is truthy: episodic="False" reset before every batch.
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be True or False, got {value!r}")
        check_positive_int(steps, "steps")
        check_positive_int(reset_every, "reset_every", optional=True)
        self.reset_every = reset_every
        #: updates since the last reset (part of the state: checkpoints keep it, reset() zeroes it)
        self.num_updates = 0
        self.model = model
        self.skip_modules = skip_modules  # read by select_params, below
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
        uncache_attention_biases(model)
        switched = use_batch_stats(model, alpha=bn_alpha) if self.batch_stats else None
        if switched == 0 and not self.has_optimizer:
            # GroupNorm/LayerNorm models have no batch statistics to adapt: say so
            # rather than report source-model numbers under this method's name
            warn_at_caller(f"{self.method_name or type(self).__name__}: the model has no BatchNorm layer, "
                           "so there are no statistics to adapt and it predicts as the source model")
        model.requires_grad_(False)
        self.adapted = self.select_params() if self.has_optimizer else []
        if self.has_optimizer and not self.adapted:
            raise ValueError(nothing_to_adapt_message(model, self.method_name or type(self).__name__))
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
                [p for _, p in self.adapted], optimizer, lr, momentum, weight_decay, betas, nesterov
            )
        if amp == "fp16" and self.optimizer is not None:
            self.scaler = torch.amp.GradScaler("cuda")
        self.guard = CollapseGuard.from_option(collapse_guard)
        if self.guard is not None:
            if self.optimizer is None:
                raise ValueError(f"collapse_guard needs a gradient method, not {self.method_name!r}")
            self.guard.attach(model)
        self._source_state: dict[str, Any] | None = None
        mark_wrapped(model, self)

    # -- the three ideas -------------------------------------------------------------
    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        """Which parameters adapt. Default: the affine parameters of every norm layer
        outside ``skip_modules``. Runs inside ``__init__``: a method whose choice
        depends on its own options sets them before ``super().__init__``."""
        return select_norm_params(self.model, frozen_top(self.model, self.skip_modules))

    def margin(self, option: str, num_classes: int) -> float:
        """The entropy margin that option ``option`` sets: its value, or when it is
        ``None`` its fraction of ln C (:attr:`margin_fractions`)."""
        return entropy_margin(getattr(self, option), self.margin_fractions[option], num_classes)

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
            dtype = floating_dtype(self.model)
            if dtype is not None and x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        if self.batch_stats:
            refuse_single_image_statistics(self.model, x.shape[0], self.method_name or "this method")
        if self.amp == "fp16" and x.device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' on the CPU")
        if x.device.type == "cpu":
            keep_freed_host_memory()  # once per process; see tta/_host_memory.py
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
            with self.logits_only(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                for step in range(self.steps):
                    logits, record = self._run_step(x)
                    self.num_updates += 1
                    if step < self.steps - 1:
                        self._reset_if_due()
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
            # A reset due at the batch's last step comes after the guard has seen the
            # batch: its check counts in the window it belongs to, and the window after
            # the reset starts empty (as reset() says), not with the old model's batch.
            self._reset_if_due()
        except BaseException:
            undo.restore()
            raise
        record.num_collapses = self.guard.num_collapses if self.guard is not None else 0
        record.guard_fallback = fallback is not None
        self.last_record = record
        return logits if fallback is None else fallback

    def _reset_if_due(self) -> None:
        # Updates are counted per step and the reset falls at the step that reaches
        # the count (mid-batch when steps > 1), as the port resets inside its steps
        # loop; a batch whose later step raises restores the count with the rest
        # (StepUndo).
        if self.reset_every is not None and self.num_updates >= self.reset_every:
            self.reset()

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
        self._fix_lr(self.paper_lr(batch_size))

    def _fix_lr(self, lr: float) -> None:
        """``lr="paper"`` resolved to ``lr``: in the optimizer and in the snapshot
        :meth:`reset` returns to, for the rest of the stream."""
        self.lr = lr
        groups = list(self.optimizer.param_groups)
        if self._source_state is not None:  # snapshot taken before the first batch
            groups += self._source_state.get("_extra_state", {}).get("optimizer", {}).get("param_groups", [])
        for group in groups:
            group["lr"] = lr
        self._lr_rule = None

    # -- shared step pieces ------------------------------------------------------------
    @contextmanager
    def logits_only(self) -> Iterator[None]:
        """Within the block a forward of the model that returns no tensor is refused
        with the fix. A model returning a dict or a tuple (Hugging Face's) failed deep
        in a loss ("'dict' object has no attribute 'float'"); a hook says so at its
        output instead, living for the block only (the model stays the caller's
        outside; none on a compiled model, whose graph it would break)."""
        check = None if self.compiled else self.model.register_forward_hook(_refuse_non_tensor_output)
        try:
            yield
        finally:
            if check is not None:
                check.remove()

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

    def grad_scale(self) -> Tensor | None:
        """The factor a float16 gradient scaler multiplied the current gradients by
        (a device tensor, no sync), or ``None`` without one: what a method that reads
        raw gradients (SAR's perturbation) divides out."""
        if self.scaler is None:
            return None
        return self.scaler.scale(torch.ones((), device=self.adapted[0][1].device))

    def source_params(self) -> list[Tensor]:
        """The source values of the adapted parameters (from the snapshot)."""
        if self._source_state is None:
            self.snapshot()
        # By identity: adapted parameters may live outside the model (a projector).
        keys = {id(p): name for name, p in self.named_parameters()}
        return [self._source_state[keys[id(p)]] for _, p in self.adapted]

    @torch.no_grad()
    def restore_adapted(self, values: list[Tensor] | None = None) -> None:
        """The adapted parameters back to ``values`` (default: their source values)
        and a fresh optimizer, nothing else: where an episode (one test image of
        TPT, RLCF, TTRV) starts, cheaper than :meth:`reset`'s whole state."""
        for (_, p), value in zip(self.adapted, self.source_params() if values is None else values):
            p.copy_(value)
        if self.optimizer is not None:
            self.optimizer.state.clear()
            self.optimizer.zero_grad(set_to_none=True)

    # -- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "method": self.method_name,
            "optimizer_type": type(self.optimizer).__name__ if self.optimizer else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "num_updates": self.num_updates,
            # lr="paper" is resolved on the first batch's size: a state saved after
            # that keeps it (a resumed stream may start on a batch of another size)
            "lr": self.lr,
            "lr_resolved": self._lr_rule is None,
        }
        if self.state_options:
            state["options"] = dict(self.state_options)
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            # torch's Optimizer.load_state_dict keeps the tensors it is given (momentum,
            # Adam's moments): steps would then move the state loaded from, another
            # method's or reset()'s snapshot. Copies, as nn.Module.load_state_dict makes.
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        self.num_updates = int(state.get("num_updates", 0))
        if self._lr_rule is not None and self.optimizer is not None and state.get("lr_resolved"):
            self._fix_lr(float(state["lr"]))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an adapted state (resuming a stream). The source state that
        :meth:`reset` returns to stays the wrapped model's own, even when this is
        called before the first batch."""
        if self._source_state is None:
            self.snapshot()
        check_loadable(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Method buffers may change shape once the class count is known (a running
        # mean prediction starts as a scalar NaN, a memory as empty): between a
        # placeholder and a sized buffer the stored shape wins (check_loadable
        # refuses any other difference).
        for name, buf in self._buffers.items():
            stored = state_dict.get(prefix + name)
            if (buf is not None and stored is not None and stored.shape != buf.shape
                    and (is_placeholder(buf) or is_placeholder(stored))):
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

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)`, `.double()`, `.half()` of the wrapped method: what it holds
        # besides its modules' parameters and buffers follows them, else the next step
        # mixes devices or dtypes (Adam's moments, the reference model of the
        # collapse guard, the source values in the snapshot that TTRV's KL reads).
        optimizer = getattr(self, "optimizer", None)
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            # `.half()` would pass the check tta.wrap makes (Adam's eps is 0 in float16:
            # NaN weights from the second batch on); refused before anything moves
            p = self.adapted[0][1]
            if fn(torch.empty(0, dtype=p.dtype, device=p.device)).dtype == torch.float16:
                raise ValueError(adam_on_float16_message(type(optimizer).__name__.lower()))
        super()._apply(fn, recurse)
        if optimizer is not None and optimizer.state:
            # torch's own rule: state takes its parameter's device and dtype (step counts stay)
            optimizer.load_state_dict(optimizer.state_dict())
        source = getattr(self, "_source_state", None)
        if source is not None:  # the extra state's optimizer is cast as above when reset loads it
            self._source_state = {k: fn(v) if isinstance(v, Tensor) else [fn(t) for t in v]
                                  if isinstance(v, list) else v for k, v in source.items()}
        guard = getattr(self, "guard", None)
        if guard is not None and guard._reference is not None:
            guard._reference._apply(fn)
        return self

    def train(self, mode: bool = True) -> "TTAMethod":
        # The wrapped model's modes are part of the method's configuration: keep them.
        self.training = mode
        return self

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}, adapted_params={len(self.adapted)}"
