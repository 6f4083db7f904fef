"""Training data of the zoo: the shared CIFAR-10 splits decoded once into uint8
tensors, and the crop + flip augmentation, on whole batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tta.data import cifar10_dir, load_image_folder


def decode_split(split: str) -> tuple[Tensor, Tensor]:
    """All images of a shared CIFAR-10 split as uint8 (N, 3, 32, 32) and labels."""
    return load_image_folder(cifar10_dir(split), shuffle=False, uint8=True)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (``pad`` px zero padding) + horizontal flip of a uint8 batch, by
    one gather: no per-image Python loop. Returns float RGB in [0, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + ox[:, None]  # (B, W)
    rows = torch.arange(h) + oy[:, None]  # (B, H)
    idx = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).float().div_(255)
