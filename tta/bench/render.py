"""The model input of a batch: the on-the-fly corruption of the domains that render
theirs (``data.kind: on_the_fly``), on the uint8 images, then floats in [0, 1]
resized to the model's input size.

Every rendered image gets its own generator, seeded from (run seed, corruption,
severity, image id): the same image shows the same corruption in every scenario,
stream order and batch, whatever the method. The generators live on the batch's
device (``run.device``): drawing there keeps a GPU fed, and CUDA draws differ from
CPU draws of the same seed, so a stream's noise is the same on every run of one
device kind, not across kinds.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..corruptions import corrupt
from .sources import Domain
from .stream import Batch, Stream, seed_for

__all__ = ["BatchRenderer", "image_seed", "to_model_size"]


def image_seed(seed: int, corruption: str, severity: int, image_id: int) -> int:
    """The seed of one rendered image's corruption noise."""
    return seed_for(seed, 3, zlib.crc32(corruption.encode()), severity, image_id)


def to_model_size(x: Tensor, size: Sequence[int] | None) -> Tensor:
    """``x`` resized (bilinear, antialiased) to the model's input ``size`` when it
    differs (None: left as it is)."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)


class BatchRenderer:
    """Turns a :class:`~tta.bench.stream.Batch` of ``stream`` into the model's
    input on the batch's device: floats, corrupted where the domain renders its
    corruption (severity tables ``preset`` of :func:`tta.corruptions.corrupt`),
    resized to ``input_size``."""

    def __init__(self, stream: Stream, *, seed: int, preset: str | None,
                 input_size: Sequence[int] | None) -> None:
        self.stream, self.seed, self.preset, self.input_size = stream, seed, preset, input_size
        self.renders = any(d.render for d in stream.domains)

    def generators(self, domain: Domain, positions: np.ndarray, device: torch.device) -> list[torch.Generator]:
        """One generator per image at ``positions`` of ``domain``."""
        assert domain.image_ids is not None, "a rendered domain names its images"
        return [torch.Generator(device=device).manual_seed(
                    image_seed(self.seed, domain.corruption, domain.severity, int(i)))
                for i in domain.image_ids[positions]]

    def __call__(self, batch: Batch) -> Tensor:
        x = batch.images
        if self.renders:
            # on the uint8 images: the same levels as on their floats, without a
            # float batch read and written (JPEG 2x faster, pixelate 1.4x at 224 px)
            x = self._corrupt(x, batch)
        return to_model_size(x.float().div_(255), self.input_size)

    def _corrupt(self, x: Tensor, batch: Batch) -> Tensor:
        s, e = self.stream.batches[batch.index]
        positions = self.stream.pos[s:e]
        groups = np.unique(batch.domains)
        out = x
        for d in groups:
            domain = self.stream.domains[int(d)]
            if not domain.render:
                continue
            if len(groups) == 1:
                return corrupt(x, domain.corruption, domain.severity, preset=self.preset,
                               generator=self.generators(domain, positions, x.device))
            # A batch of mixed domains: each domain's images are corrupted together.
            mask = batch.domains == d
            sel = torch.from_numpy(np.flatnonzero(mask)).to(x.device)
            if out is x:
                out = x.clone()
            out[sel] = corrupt(x[sel], domain.corruption, domain.severity, preset=self.preset,
                               generator=self.generators(domain, positions[mask], x.device))
        return out
