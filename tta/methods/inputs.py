"""Checks of what a method is given: the images of a batch (dtype, shape, finite
values in [0, 1]) and the model it wraps (not a method, not wrapped twice)."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn


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
    # One pass: min and max propagate NaN, and an inf is the min or the max itself
    # (15x faster than isfinite + amin + amax, ResNet-20's batch of 200 on the CPU).
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or inf pixels; the batch was not used")
    if lo < -1e-4 or hi > 1 + 1e-4:
        advice = " (looks like 0-255 pixels: divide by 255)" if hi > 2 else ""
        raise ValueError(
            f"expected pixels in [0, 1], got range [{lo:.3g}, {hi:.3g}]{advice}; "
            "tta models normalise internally, pass un-normalised RGB"
        )


# Models currently wrapped, and by whom: a method configures its model in place
# (norm layers, requires_grad, its snapshot), so two live methods on one module
# would silently undo each other. Weak both ways: a copy or a freed method is free.
_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def refuse_if_wrapped(model: nn.Module) -> None:
    """Refuse a tta method, or a model another live method has configured."""
    from .base import TTAMethod  # the base imports this module

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


def refuse_inference_weights(model: nn.Module, method: str) -> None:
    """Refuse a model whose weights are inference tensors (built or loaded inside
    ``torch.inference_mode()``): they cannot take gradients or updates."""
    if any(p.is_inference() for p in model.parameters()):
        raise ValueError(f"{method}: the model's weights were made inside torch.inference_mode() (inference "
                         "tensors), which cannot be adapted: load the model outside the block (wrapping and "
                         "calling the method inside it is fine)")


def mark_wrapped(model: nn.Module, method: nn.Module) -> None:
    """Record that ``method`` (fully built) has configured ``model``."""
    _WRAPPED[model] = weakref.ref(method)


def wrap_mark(model: nn.Module) -> "weakref.ref | None":
    """Who has configured ``model`` (as :func:`mark_wrapped` recorded it), or None."""
    return _WRAPPED.get(model)


def set_wrap_mark(model: nn.Module, mark: "weakref.ref | None") -> None:
    """Put back a :func:`wrap_mark`: a method whose constructor raised after the base
    class marked its model lives on in the traceback, and must not hold the model."""
    if mark is None:
        _WRAPPED.pop(model, None)
    else:
        _WRAPPED[model] = mark


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of most of the model's weights, by size: what inputs are
    cast to. Not the first parameter's: a learnable prompt kept in float32 comes
    first on a float64 CLIP, and float32 norm layers can sit among float16 convs."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else None


def to_model_input(images: Tensor, model: nn.Module, non_blocking: bool = False) -> Tensor:
    """``images`` (from a source loader) on the model's device, in its
    :func:`floating_dtype`: as the test batches reach it."""
    param = next(model.parameters())
    return images.to(param.device, floating_dtype(model), non_blocking=non_blocking)
