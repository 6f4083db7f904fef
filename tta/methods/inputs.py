"""Checks of the images a method is given (dtype, shape, finite values in [0, 1])."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
