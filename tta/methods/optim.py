"""Optimizers and steps: building the optimizer a method names, steps gated on
whether a loss selected any sample, and the undo record that restores a method's
state when a step raises."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .base import TTAMethod


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
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    # Checked by type first: a string from a config ("0.9") failed in a comparison
    # ("'<' not supported between instances of 'str' and 'int'"), naming no option.
    for option, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{option} must be a number >= 0, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be 'sgd', 'adam' or 'adamw' (its name, not an optimizer), got {optimizer!r}")
    name = optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
    if name in ("adam", "adamw"):
        params = list(params)
        if any(p.dtype == torch.float16 for p in params):
            raise ValueError(adam_on_float16_message(optimizer))
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")


def adam_on_float16_message(optimizer: str) -> str:
    return (f"optimizer={optimizer!r} on float16 parameters: Adam's eps (1e-08) is 0 in float16, so its "
            "steps divide by zero and turn the weights to NaN. Keep the model in float32 and pass "
            "amp='bf16' (or 'fp16' on CUDA: the forward in half precision, the steps in float32), or "
            "use optimizer='sgd'")


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


def _clone_all(tensors: list[Tensor]) -> list[Tensor]:
    # One fused kernel per dtype and device on CUDA instead of a launch per tensor.
    if tensors and all(t.is_floating_point() for t in tensors) and len({t.device for t in tensors}) == 1:
        return list(torch._foreach_mul(tensors, 1.0))
    return [t.clone() for t in tensors]


class StepUndo:
    """What one ``forward`` may change, copied before it, so that a call that raises
    (out of memory, ``KeyboardInterrupt``, a failing hook, between SAR's two passes)
    leaves the method exactly as it was: the adapted parameters (and their
    gradients), every buffer of the method and its model (buffers are often
    reassigned rather than written, so they are restored by name), the optimizer
    state, the collapse guard, the gradient scaler and the update count; and the parameters of the
    model copies a step moves (``updated_copies``: a mean teacher). For norm-affine
    methods this is a few kilobytes; no host sync."""

    def __init__(self, method: "TTAMethod") -> None:
        self.method = method
        # The adapted parameters, and those of the copies a step moves (a mean
        # teacher, a key encoder: the method's ``updated_copies``).
        self.params = [p for _, p in method.adapted] + [
            p for name in method.updated_copies for p in getattr(method, name).parameters()]
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
        self.num_updates = method.num_updates

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
        method.num_updates = self.num_updates


@torch.no_grad()
def sam_ascent(params: Sequence[nn.Parameter], rho: float, grad_scale: Tensor | None = None) -> list[Tensor]:
    """Sharpness-aware minimisation's first half (Foret et al., ICLR 2021): move every
    parameter by ``rho * g / ||g||`` (``||g||``: the L2 norm over all of their
    gradients), the worst point within radius ``rho`` to first order, and return the
    offsets for :func:`undo_sam_ascent`. ``grad_scale``: the factor a float16
    gradient scaler multiplied the gradients by (divided out here); gradients that
    overflowed give no offset, and the scaler then skips the step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if grad_scale is not None:
        grads = [g / grad_scale for g in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    offsets = [g * (rho / (norm + 1e-12)) for g in grads]
    if grad_scale is not None:
        finite = norm.isfinite()
        offsets = [torch.where(finite, o, torch.zeros_like(o)) for o in offsets]
    for p, offset in zip(params, offsets):
        p.add_(offset)
    return offsets


@torch.no_grad()
def undo_sam_ascent(params: Sequence[nn.Parameter], offsets: Sequence[Tensor]) -> None:
    """Undo :func:`sam_ascent`: back to the weights the SAM step updates, with the
    gradient taken at the perturbed point."""
    for p, offset in zip(params, offsets):
        p.sub_(offset)
