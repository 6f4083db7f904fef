"""Class prototypes of the source data and the contrastive loss that pulls test
features toward them: the pieces RMT (Döbler et al., CVPR 2023) and SANTA
(Chakrabarty et al., TMLR 2023) share.

Both methods split the model into a feature extractor and a classifier
(pooled (B, D) features and the last layer, :mod:`.features`),
average the features of labelled source images per class once (the prototypes),
and at every step contrast three views of each test image through a small
projector: its nearest prototype, its features and the features of an augmented
copy (SupCon's loss, Khosla et al. 2020, with each image's own views as the only
positives).
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import check_feature_split, classifier_head, pooled_features
from .inputs import floating_dtype, to_model_input

__all__ = ["check_prototype_options", "needs_source_loader", "SourceStream", "source_prototypes", "make_projector",
           "attach_prototypes", "nearest_prototype", "prototype_contrastive_loss"]


def check_prototype_options(model: nn.Module, method: str, source_loader: Iterable | None, what: str, *,
                            loss_weights: Iterable[float], num_prototype_images: int, projection_dim: int,
                            temperature: float) -> None:
    """The checks RMT and SANTA make before wrapping: a model with the feature
    split, labelled source images, and options in range."""
    check_feature_split(model, method)
    needs_source_loader(source_loader, method, what)
    if min(loss_weights) < 0 or temperature <= 0:
        raise ValueError(f"{method}: the loss weights must be >= 0 and the temperature > 0, got "
                         f"{list(loss_weights)} and {temperature!r}")
    for name, value in (("num_prototype_images", num_prototype_images), ("projection_dim", projection_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{method}: {name} must be a positive integer, got {value!r}")


def needs_source_loader(source_loader: Iterable | None, method: str, what: str) -> None:
    """Refuse to wrap without labelled source images, saying how to give them."""
    if source_loader is None:
        raise ValueError(
            f"{method} needs labelled source images ({what}): set data.source_root in tta-bench, "
            "or pass source_loader= in Python (an iterable of (images in [0, 1], labels) batches, "
            "e.g. tta.bench.source_data.SourceBatches)"
        )


class SourceStream:
    """The (images, labels) batches of ``loader``, pass after pass without end, and
    how many it has given (``read``), which :meth:`advance` moves on. A replay
    position is part of a method's state: a resumed run replays from there."""

    def __init__(self, loader: Iterable, method: str) -> None:
        self.loader, self.method, self.read = loader, method, 0
        self._per_pass = len(loader) if isinstance(loader, Sized) else 0
        self._pass: Iterator | None = None  # the pass being read
        self._in_pass = 0
        self._held: tuple[Tensor, Tensor] | None = None  # read by peek, not given yet

    def __iter__(self) -> "SourceStream":
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = self.peek()
        self._held = None
        self.read += 1
        return batch

    def peek(self) -> tuple[Tensor, Tensor]:
        """The next batch, still to be given by ``next``."""
        while self._held is None:
            if self._pass is None:
                self._pass, self._in_pass = iter(self.loader), 0
            batch = next(self._pass, None)
            if batch is not None:
                self._in_pass += 1
                self._held = _images_and_labels(batch, self.method)
            elif self._in_pass == 0:
                raise ValueError(f"{self.method}: source_loader yielded no batches")
            else:
                self._pass = None
        return self._held

    def advance(self, n: int) -> None:
        """Move ``n`` batches on. A pass passed over whole is only started (one batch
        read): a loader may count its passes and order each by that count, as
        tta-bench's does; within a pass the batches are read."""
        while n > 0:
            if self._held is None and self._pass is None and self._per_pass and n >= self._per_pass:
                next(iter(self.loader), None)
                n -= self._per_pass
                self.read += self._per_pass
            else:
                next(self)
                n -= 1

    def __deepcopy__(self, memo: dict) -> "SourceStream":
        # A pass in progress (a generator) cannot be copied: the copy reads the
        # shared loader afresh, to the same count (exact for a loader that gives the
        # same batches in the same order each pass)
        twin = SourceStream(self.loader, self.method)
        twin.advance(self.read)
        return twin


def _images_and_labels(batch: Any, method: str) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
        raise TypeError(f"{method}: source_loader must yield (images, labels) batches, got {type(batch).__name__}")
    labels = batch[1] if isinstance(batch[1], Tensor) else torch.as_tensor(batch[1])
    return batch[0], labels


@torch.no_grad()
def source_prototypes(model: nn.Module, loader: Iterable, max_images: int, method: str) -> Tensor:
    """The mean feature of each class over the source images, (C, D) float32.

    The features are the model's as it is configured (BatchNorm on the statistics
    of each source batch, as the official code computes them). Whole batches are
    read until more than ``max_images`` images are seen (the official rule; its
    100,000 covers all of CIFAR-10 and 1,563 batches of 64 ImageNet images)."""
    param = next(model.parameters())
    head = classifier_head(model)
    sums = counts = None
    seen, invalid = 0, torch.zeros((), dtype=torch.bool, device=param.device)
    for batch in loader:
        images, labels = _images_and_labels(batch, method)
        features = pooled_features(model, to_model_input(images, model))
        if features.dim() != 2:
            raise ValueError(f"{method}: the model's features must be pooled (B, D) "
                             f"got shape {tuple(features.shape)}")
        if sums is None:
            num_classes = head(features[:1]).shape[1]
            sums = torch.zeros(num_classes, features.shape[1], device=param.device)
            counts = torch.zeros(num_classes, device=param.device)
        labels = labels.to(param.device, torch.long)
        # Checked once after the pass (no sync per batch); clamped meanwhile, as an
        # out-of-range index would be a device-side assert on CUDA.
        invalid = invalid | ((labels < 0) | (labels >= sums.shape[0])).any()
        labels = labels.clamp(0, sums.shape[0] - 1)
        sums.index_add_(0, labels, features.float())
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
        seen += images.shape[0]
        if seen > max_images:
            break
    if sums is None:
        raise ValueError(f"{method}: source_loader yielded no batches")
    if bool(invalid):
        raise ValueError(f"{method}: source labels must be class indices in [0, {sums.shape[0]})")
    absent = (counts == 0).nonzero().flatten().tolist()
    if absent:
        # The official code would average nothing into a NaN prototype, which every
        # test image then takes as its nearest.
        raise ValueError(f"{method}: the source images hold no image of class(es) {absent[:10]}; "
                         "every class needs a prototype (use more source images)")
    return sums / counts[:, None]


def make_projector(in_dim: int, width: int = 128) -> nn.Sequential:
    """The projection head the contrastive loss compares in:
    ``Linear(in_dim, width) -> ReLU -> Linear(width, width)``."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))


def attach_prototypes(method: nn.Module, source_loader: Iterable, num_images: int, width: int) -> None:
    """Give a wrapped ``method`` the source prototypes of its model (buffer
    ``prototypes``) and a fresh projector (submodule ``projector``), which its
    optimizer trains as a second parameter group at the first group's learning rate
    (as the official code adds it) and which is listed among ``method.adapted`` so
    that a step that fails is undone for it too."""
    name = method.method_name or type(method).__name__
    prototypes = source_prototypes(method.model, source_loader, num_images, name)
    method.register_buffer("prototypes", prototypes)
    param = next(method.model.parameters())
    method.projector = make_projector(prototypes.shape[1], width).to(param.device, floating_dtype(method.model))
    params = list(method.projector.named_parameters())
    method.optimizer.add_param_group({"params": [p for _, p in params], "lr": method.optimizer.param_groups[0]["lr"]})
    method.adapted += [(f"projector.{n}", p) for n, p in params]


@torch.no_grad()
def nearest_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """Per row of ``features`` (B, D), the index of the prototype (C, D) of highest
    cosine similarity."""
    sim = F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T
    return sim.argmax(1)


def prototype_contrastive_loss(
    head: nn.Module, prototypes: Tensor, features: Tensor, aug_features: Tensor, temperature: float,
) -> Tensor:
    """SupCon's loss (all views anchors, no labels) over three views of each of the B
    test images: its nearest source prototype (a constant), its ``features`` and the
    features of its augmented copy ``aug_features``, each (B, D) and projected by
    ``head`` to the unit sphere.

    Each of the 3B rows takes the two other views of its image as positives and
    every other row as the denominator: ``-1/2 sum_p log softmax_{k != a}(z_a . z_k /
    temperature)_p``, averaged over the rows. Other images' views, their prototypes
    included (even the same prototype), are negatives."""
    nearest = nearest_prototype(features, prototypes)
    dtype = next(head.parameters()).dtype
    views = torch.cat([prototypes[nearest], features.float(), aug_features.float()]).to(dtype)
    z = F.normalize(head(views).float(), dim=1)
    sim = z @ z.T / temperature
    rows = sim.shape[0]
    self_pair = torch.eye(rows, dtype=torch.bool, device=sim.device)
    log_prob = sim - sim.masked_fill(self_pair, float("-inf")).logsumexp(1, keepdim=True)
    image = torch.arange(rows, device=sim.device) % features.shape[0]
    positive = (image[:, None] == image[None, :]) & ~self_pair
    num_positives = rows // features.shape[0] - 1
    return -(torch.where(positive, log_prob, 0.0).sum(1) / num_positives).mean()
