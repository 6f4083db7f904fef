"""Shared helpers: random streams, the context of a rendering, quantisation.
Filters are in ``_filters``, resampling (zooms, motion blur, Pillow's box) in
``_resample``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

# Float-to-uint8 tolerance: ``np.uint8`` truncates, and a float32 result that lands a
# hair below an integer (255 * (v / 255) in float32) would otherwise lose a level.
_FLOOR_EPS = 1e-3


class Rng:
    """Random draws from a ``torch.Generator`` (or the global RNG), made on the
    generator's device and moved to the images' device, so one seed gives the same
    corruption whatever device the images live on.

    With a sequence of generators, one per image, every draw (whose first
    dimension is always the batch) takes image ``i``'s part from generator ``i``:
    an image's corruption then depends on its own generator only, not on which
    other images share its batch or where it sits in it. torch has no batched draw
    with per-sample seeds, so this mode loops over the images for the draws only
    (the corruption itself stays batched); its cost is measured in
    ``benchmarks/per_image_seeding_cost.py`` (RESULTS.md)."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None,
                 device: torch.device, dtype: torch.dtype):
        if generator is None or isinstance(generator, torch.Generator):
            self.generator, self.generators = generator, None
            self.source = generator.device if generator is not None else device
        else:
            self.generator, self.generators = None, list(generator)
            self.source = self.generators[0].device
        self.device = device
        self.dtype = dtype

    def _out(self, t: Tensor) -> Tensor:
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        if not shape or shape[0] != len(self.generators):
            raise RuntimeError(
                f"a per-image draw of shape {shape} does not lead with the batch of {len(self.generators)}"
            )

    def _draw(self, shape: tuple[int, ...], fill: Callable[[Tensor, torch.Generator | None], Tensor],
              dtype: torch.dtype = torch.float32) -> Tensor:
        """A tensor of ``shape`` filled in place by ``fill(tensor, generator)`` (what
        ``torch.rand``/``randn``/``randint`` do inside, so one generator gives their
        numbers); per image, each image's slice from its own generator (a stack of
        per-image draws would cost another pass over the batch)."""
        out = torch.empty(shape, dtype=dtype, device=self.source)
        if self.generators is None:
            fill(out, self.generator)
            return out
        self._check_batch(shape)
        for part, g in zip(out, self.generators):
            fill(part, g)
        return out

    def uniform(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0) -> Tensor:
        # always drawn in float32, so float64 inputs see the same random numbers
        u = self._draw(shape, lambda t, g: t.uniform_(generator=g))
        if (low, high) != (0.0, 1.0):  # in place: these tensors are image-sized
            u.mul_(high - low).add_(low)
        return self._out(u)

    def normal(self, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> Tensor:
        n = self._draw(shape, lambda t, g: t.normal_(generator=g))
        if std != 1.0:
            n.mul_(std)
        if mean != 0.0:
            n.add_(mean)
        return self._out(n)

    def randint(self, low: int, high: int, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> Tensor:
        """Integers in ``[low, high)``, like ``np.random.randint``; a smaller ``dtype``
        holds the same numbers. A power-of-two range takes them from the bits of
        30-bit draws, several per draw (glass blur's offsets in [-4, 4): ten per
        draw, the same uniform law); other ranges one 32-bit draw each."""
        span = high - low
        if 1 < span <= 1 << 15 and span & (span - 1) == 0:
            bits = span.bit_length() - 1
            return self._out(self._draw(shape, lambda t, g: _fill_from_bits(t, low, bits, g), dtype))
        return self._out(self._draw(shape, lambda t, g: t.random_(low, high, generator=g), dtype))

    def randint_below(self, high: Tensor) -> Tensor:
        """One integer in ``[0, high[i])`` per entry of the integer tensor ``high``."""
        u = self._draw(tuple(high.shape), lambda t, g: t.uniform_(generator=g), torch.float64)
        return self._out(torch.floor(u * high.to(self.source, torch.float64)).long())

    def poisson(self, rates: Tensor) -> Tensor:
        rates = rates.to(self.source, torch.float32)
        if self.generators is None:
            return self._out(torch.poisson(rates, generator=self.generator))
        self._check_batch(tuple(rates.shape))
        out = torch.empty_like(rates)
        for part, r, g in zip(out, rates, self.generators):
            part.copy_(torch.poisson(r, generator=g))
        return self._out(out)


# random_(0, 2**30) makes one 32-bit draw per value and keeps its low 30 bits
_DRAW_BITS = 30


def _fill_from_bits(t: Tensor, low: int, bits: int, generator: torch.Generator | None) -> Tensor:
    """``t`` filled with ``low`` plus independent ``bits``-bit fields of 30-bit
    draws, ``30 // bits`` fields a draw: the generator is the cost of a uniform
    integer on the CPU (~3 ns a draw, one thread), the bit fields are not."""
    per_draw = _DRAW_BITS // bits
    n = t.numel()
    draws = torch.empty(-(-n // per_draw), dtype=torch.int32, device=t.device)
    draws.random_(0, 1 << _DRAW_BITS, generator=generator)
    fields = torch.empty((per_draw, draws.numel()), dtype=torch.int32, device=t.device)
    for j in range(per_draw):  # a scalar shift per field: 5x a broadcast shift tensor
        torch.bitwise_right_shift(draws, j * bits, out=fields[j])
    fields = fields.bitwise_and_((1 << bits) - 1).view(-1)[:n]
    return t.copy_(fields.view(t.shape)).add_(low)


@dataclass
class Context:
    """Everything a corruption needs besides the images and its severity row."""

    rng: Rng
    preset: str
    table: dict[str, Any]
    quantize: bool
    frost_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A scratch tensor of ``shape`` kept for the chunks of one call (the last,
        smaller chunk gets its leading part). Where freed memory goes back to the
        kernel (``TTA_HOST_ALLOCATOR=default``, other allocators), each chunk would
        fault its temporaries in again page by page: that doubled the noises' time."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or (buf.dtype, buf.device) != (
            dtype,
            torch.device(device),
        ):
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf[: shape[0]]


def floor_levels_(t: Tensor) -> Tensor:
    """``np.uint8(t * 255) / 255`` in place, for ``t`` in [0, 1]: the original
    truncates its float layers to 8 bits where it writes them out (PNG round trips,
    ``np.uint8`` casts)."""
    return t.mul_(255).add_(_FLOOR_EPS).floor_().div_(255)


def quantize_into(y: Tensor, out: Tensor, mode: str) -> Tensor:
    """``out`` = ``y`` as 8-bit levels in [0, 1], clipped (as 0-255 for a uint8
    ``out``). ``mode="floor"``: as ``np.uint8(y * 255)``, the original's cast of its
    float results; ``"round"``: the nearest level, for the corruptions whose
    original returns Pillow's 8-bit images (resize, JPEG), which round. ``y`` is
    scratch (overwritten)."""
    offset = _FLOOR_EPS if mode == "floor" else 0.5
    levels = y.mul_(255).add_(offset).floor_().clamp_(0, 255)
    if out.dtype == torch.uint8:
        # whole numbers: through int16, as float-to-uint8 conversion runs 4x slower
        return out.copy_(levels.to(torch.int16))
    return torch.div(levels, 255, out=out)


def zero_below_(t: Tensor, threshold: float) -> Tensor:
    """``torch.where(t < threshold, 0, t)`` in place, by multiplying with
    ``clamp(sign(t - threshold) + 1, 0, 1)``: the sign of a float difference is
    exact, and float ops run 10-20x faster than masked_fill or where (bool tensors)
    on the CPU."""
    return t.mul_((t - threshold).sign_().add_(1).clamp_(0, 1))


def to_uint8(x: Tensor, memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
    """8-bit levels of images in [0, 1], rounded half up (as the original's uint8
    images are made). Truncating ``x * 255 + 0.5`` is the rounding for values >= 0;
    through int16 because float-to-uint8 conversion runs 4x slower on the CPU."""
    scaled = scaled_half_up(x)
    if memory_format == torch.channels_last and x.dim() == 4 and not channels_last(scaled):
        # Interleaving the float planes by stacking them beats transposing the bytes
        # (224-px RGB, 1 thread: 0.08 against 0.17 ms an image for the whole function).
        pixels = torch.stack(scaled.unbind(1), dim=-1).to(torch.int16).to(torch.uint8)
        return pixels.permute(0, 3, 1, 2)
    return scaled.to(torch.int16).to(torch.uint8, memory_format=memory_format)


def scaled_half_up(x: Tensor) -> Tensor:
    """``x * 255 + 0.5`` in one pass (a fused multiply-add, 1.7x faster than two
    steps; its ``floor``, the 8-bit level rounded half up, is that of two roundings
    but within a float epsilon of a rounding boundary, far from the 8-bit levels
    images come in)."""
    return torch.add(torch.full((), 0.5, dtype=x.dtype, device=x.device), x, alpha=255)


def round_half_up(v: Tensor) -> Tensor:
    # torch.round rounds ties to even; C code doing (v + 0.5) >> 0 rounds them up.
    return torch.floor(v + 0.5)


def channels_last(x: Tensor) -> bool:
    # tta.data's loaders (and models run channels-last) give such images
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
