"""Scenarios as streams of batches, and the loader that feeds them to the device.

:func:`build_stream` orders the images of the domains the way a scenario says
(domain after domain, shuffled together, classes in Dirichlet runs) and cuts the
order into batches; every random choice comes from seeded generators, so the same
config gives the same stream. :class:`BatchLoader` yields the batches as uint8
tensors on the run device, either from a tensor cache decoded once (small sets) or
through DataLoader workers (large sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .pools import ImagePool, decode_all
from .settings import DataConfig, RunConfig, ScenarioConfig
from .sources import Domain, build_domains

__all__ = ["Stream", "Batch", "build_stream", "dirichlet_order", "BatchLoader", "seed_for", "open_stream",
           "bad_files"]


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across runs and platforms). The
    run seed comes first, then a number naming what the seed is for: 1 a domain's
    order, 2 the mixing of domains (both as numpy seed lists), 3 a rendered
    image's corruption (:mod:`.render`), 4 the DataLoader's workers."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def dirichlet_order(labels: np.ndarray, gamma: float, num_slots: int, rng: np.random.Generator) -> np.ndarray:
    """An order of ``labels``' positions with online label shift: each class is
    spread over ``num_slots`` consecutive time slots with proportions drawn from
    ``Dirichlet(gamma)``, and the slots are concatenated (the non-i.i.d. streams of
    NOTE, SAR and DeYO). Small ``gamma`` puts each class in few slots; large
    ``gamma`` approaches an i.i.d. order."""
    if gamma <= 0 or num_slots < 1:
        raise ValueError(f"label shift needs gamma > 0 and num_slots >= 1, got {gamma}, {num_slots}")
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        share = rng.dirichlet([gamma] * num_slots)
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
        for slot, part in zip(slots, np.split(members, cuts)):
            slot.extend(part.tolist())
    return np.array([i for slot in slots for i in rng.permutation(slot)], dtype=np.int64)


@dataclass
class Stream:
    """The images of a run in stream order: element ``e`` is image ``pos[e]`` of
    domain ``dom[e]``; batch ``b`` is elements ``batches[b][0]:batches[b][1]``;
    the method is reset before the batches in ``resets``."""

    domains: list[Domain]
    dom: np.ndarray
    pos: np.ndarray
    batches: list[tuple[int, int]]
    resets: set[int] = field(default_factory=set)

    @property
    def labels(self) -> np.ndarray:
        out = np.empty(len(self.dom), dtype=np.int64)
        for d, domain in enumerate(self.domains):
            sel = self.dom == d
            out[sel] = domain.labels[self.pos[sel]]
        return out

    def __len__(self) -> int:
        return len(self.dom)


def cut_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``range(n)`` in batches of ``batch_size``, as ``(start, end)``; a last batch of
    one image joins the one before (``batch_size + 1`` images): alone, BatchNorm
    methods would normalise it by its own statistics, which they refuse, and a run
    of 201 images in batches of 100 would fail at its end."""
    cuts = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if batch_size > 1 and len(cuts) > 1 and cuts[-1][1] - cuts[-1][0] == 1:
        cuts[-2:] = [(cuts[-2][0], n)]
    return cuts


def build_stream(
    domains: Sequence[Domain], scenario: ScenarioConfig, batch_size: int, seed: int,
    num_classes: int | None = None,
) -> Stream:
    """Order the domains' images as ``scenario`` says and cut them into batches.

    Batches never straddle two domains unless the scenario mixes them
    (``mix_domains``); the last batch of a domain may be smaller, but not a single
    image where batches are larger (see :func:`cut_batches`).
    """
    if batch_size < 1:
        raise ValueError(f"run.batch_size must be >= 1, got {batch_size}")
    if scenario.mix_domains and (scenario.reset_each_shift or scenario.label_shift_gamma is not None):
        # both would be silently undone by the shuffle of all images together
        what = ("scenario.reset_each_shift=true (a mixed stream has no domain shift to reset at)"
                if scenario.reset_each_shift else
                "scenario.label_shift_gamma (the shuffle of all images together undoes its class order)")
        raise ValueError(f"{what} does not go with scenario.mix_domains=true; drop one of them")
    doms, poss = [], []
    for d, domain in enumerate(domains):
        rng = np.random.default_rng([seed, 1, d])
        if scenario.label_shift_gamma is not None:
            slots = scenario.label_shift_slots or num_classes or int(domain.labels.max()) + 1
            order = dirichlet_order(domain.labels, float(scenario.label_shift_gamma), int(slots), rng)
        else:
            order = rng.permutation(len(domain))
        doms.append(np.full(len(order), d, dtype=np.int64))
        poss.append(order)
    if scenario.mix_domains:
        dom, pos = np.concatenate(doms), np.concatenate(poss)
        perm = np.random.default_rng([seed, 2]).permutation(len(dom))
        dom, pos = dom[perm], pos[perm]
        return Stream(list(domains), dom, pos, cut_batches(len(dom), batch_size))
    batches, resets, start = [], set(), 0
    for d, order in enumerate(poss):
        if d > 0 and scenario.reset_each_shift:
            resets.add(len(batches))
        batches += [(start + s, start + e) for s, e in cut_batches(len(order), batch_size)]
        start += len(order)
    return Stream(list(domains), np.concatenate(doms), np.concatenate(poss), batches, resets)


# ----------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------


def _worker_context() -> str | None:
    """Start method for DataLoader workers: the default, except inside processes
    whose default is not a standard one (joblib's loky workers say 'loky', which
    DataLoader cannot use; fork works there)."""
    import multiprocessing as mp

    if mp.get_start_method(allow_none=True) in (None, "fork", "spawn", "forkserver"):
        return None
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@dataclass
class Batch:
    """One step of the stream: uint8 images and labels on the run device, the
    domain index of each image (host), and the batch's index in the stream."""

    index: int
    images: Tensor
    labels: Tensor
    domains: np.ndarray
    reset: bool


class _StreamItems(Dataset):
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, e: int) -> tuple[Tensor, int, int]:
        d = int(self.stream.dom[e])
        domain = self.stream.domains[d]
        p = int(self.stream.pos[e])
        return domain.pool.read(int(domain.rows[p])), int(domain.labels[p]), d


class BatchLoader:
    """Yields the stream's batches on ``device``.

    Sets up to ``cache_mb`` are decoded once into one uint8 tensor (rows shared by
    domains that show the same images, e.g. on-the-fly corruptions of one clean
    set), kept on the device when it is a GPU; each batch is then one
    ``index_select``. Larger sets stream through a DataLoader with ``num_workers``
    processes and pinned memory.

    Neither path draws from torch's global RNG, so a method that does (e.g. DeYO's
    patch shuffle) sees the same random numbers on both, and a run resumed from a
    checkpoint (which restores the global RNG state) continues where it stopped:
    the DataLoader gets its own generator, seeded from ``seed``, for the base seed
    it draws per iterator (it would take it from the global RNG otherwise).
    """

    def __init__(self, stream: Stream, device: torch.device, *, cache_mb: float = 4096,
                 num_workers: int = 0, seed: int = 0) -> None:
        self.stream, self.device, self.num_workers = stream, torch.device(device), int(num_workers)
        self.seed = int(seed)
        self.labels = torch.from_numpy(stream.labels)
        # Unique (pool, row) pairs the stream touches, numbered in first-use order.
        self._needed: dict[str, tuple[ImagePool, list[int]]] = {}
        for domain in stream.domains:
            pool, used = self._needed.setdefault(domain.pool.key, (domain.pool, []))
            used.extend(domain.rows.tolist())
        shapes = {pool.image_shape() for pool, _ in self._needed.values()}
        if len(shapes) > 1:
            raise ValueError(f"domains have images of different shapes {sorted(shapes)}: set data.image_size")
        self.image_shape = shapes.pop()
        total = sum(len(set(rows)) for _, rows in self._needed.values())
        self.cache_bytes = total * math.prod(self.image_shape)
        self.cached = self.cache_bytes <= cache_mb * 2**20
        self._cache: Tensor | None = None
        self._elem_rows: Tensor | None = None

    def prepare(self) -> None:
        """Decode the cache (no-op when streaming). Called before timing starts."""
        if not self.cached or self._cache is not None:
            return
        chunks, offsets = [], {}
        base = 0
        for key, (pool, rows) in self._needed.items():
            unique = np.unique(np.asarray(rows, dtype=np.int64))
            chunks.append(decode_all(pool, unique, self.num_workers))
            offsets[key] = (base, unique)
            base += len(unique)
        cache = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        elem_rows = np.empty(len(self.stream), dtype=np.int64)
        for d, domain in enumerate(self.stream.domains):
            start, unique = offsets[domain.pool.key]
            sel = np.flatnonzero(self.stream.dom == d)
            elem_rows[sel] = start + np.searchsorted(unique, domain.rows[self.stream.pos[sel]])
        if self.device.type == "cuda":
            cache = cache.to(self.device)
            self.labels = self.labels.to(self.device)
        self._cache = cache
        self._elem_rows = torch.from_numpy(elem_rows).to(cache.device)

    def __len__(self) -> int:
        return len(self.stream.batches)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Batch]:
        """The batches from index ``start`` on (resuming a checkpointed run); the
        earlier ones are not read."""
        stream = self.stream
        if self.cached:
            self.prepare()
            assert self._cache is not None and self._elem_rows is not None
            for b, (s, e) in enumerate(stream.batches[start:], start):
                rows = self._elem_rows[s:e]
                x = self._cache.index_select(0, rows).to(self.device, non_blocking=True)
                y = self.labels[s:e].to(self.device, non_blocking=True)
                yield Batch(b, x, y, stream.dom[s:e], b in stream.resets)
            return
        loader = DataLoader(
            _StreamItems(stream),
            batch_sampler=[range(s, e) for s, e in stream.batches[start:]],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None,
            multiprocessing_context=_worker_context() if self.num_workers > 0 else None,
            # Workers' seeds come from here, not from the global RNG (see the class doc).
            generator=torch.Generator().manual_seed(seed_for(self.seed, 4)),
        )
        for b, (x, y, _) in enumerate(loader, start):
            s, e = stream.batches[b]
            yield Batch(b, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                        stream.dom[s:e], b in stream.resets)


# ----------------------------------------------------------------------------------
# The stream stage of a run
# ----------------------------------------------------------------------------------


def open_stream(data: DataConfig, scenario: ScenarioConfig, run: RunConfig, device: torch.device, *,
                input_size: Sequence[int] | None, model_classes: int | None, model_name: str
                ) -> tuple[Stream, BatchLoader]:
    """The run's stream and its loader: the domains of ``data`` (checked against
    the model's classes), ordered and batched as ``scenario`` and ``run`` say."""
    domains, num_classes = build_domains(data, scenario, input_size=input_size, seed=run.seed)
    if num_classes is not None and model_classes is not None and num_classes != model_classes:
        note = domains[0].classes_note
        raise ValueError(
            f"data {data.name} has {num_classes} classes{f' ({note})' if note else ''} but model {model_name} "
            f"predicts {model_classes}: pick a matching model (or data.class_index)"
        )
    max_label = max(int(d.labels.max()) for d in domains)
    if model_classes is not None and max_label >= model_classes:
        raise ValueError(f"labels go up to {max_label} but model {model_name} predicts {model_classes} classes")
    stream = build_stream(domains, scenario, run.batch_size, run.seed, num_classes or model_classes)
    loader = BatchLoader(stream, device, cache_mb=data.cache_mb, num_workers=data.num_workers, seed=run.seed)
    return stream, loader


def bad_files(stream: Stream) -> list[tuple[str, str]]:
    """``(path, reason)`` of the files ``data.skip_bad_files`` left out of the
    stream's pools (the check before streaming)."""
    pools = {id(d.pool): d.pool for d in stream.domains}.values()
    return list(dict.fromkeys(b for pool in pools for b in getattr(pool, "bad_files", ())))
