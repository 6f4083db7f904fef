"""``adacontrast``: contrastive test-time adaptation (Chen, Wang, Darrell, Ebrahimi,
CVPR 2022).

The whole network (every weight and bias) adapts, online, with three losses on each
batch: cross-entropy of a strongly augmented view against pseudo-labels, a MoCo-style
contrastive loss, and a diversity loss. The pseudo-labels are the model's
predictions on a weakly augmented view, refined by soft voting among their nearest
neighbours in a memory bank of recent features and predictions. The contrastive loss
pairs two strong views of each image: the query from the adapted model, the key from
a key encoder that follows the model by an exponential moving average, against a
queue of past keys, leaving out the negatives whose pseudo-label is the query's own.

Written from the authors' code (DianCh/AdaContrast, offline source-free adaptation)
and its online port (mariodoebler/test-time-adaptation), whose setting this follows:
the bank starts empty, the pseudo-labels are the argmax until it holds enough.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment.kornia_views import (adacontrast_strong_augmentation, adacontrast_weak_augmentation,
                                     check_transform)
from .base import TTAMethod
from .features import check_feature_split, features_and_logits, pooled_features
from .params import select_weights_and_biases
from .records import AdaContrastRecord, StepRecord
from .registry import register_method
from .teacher import ema_update_, frozen_copy

__all__ = ["AdaContrast", "knn_soft_voting", "contrastive_logits"]

BN_MODES = ("running", "batch")
DISTANCES = ("cosine", "euclidean")


@torch.no_grad()
def knn_soft_voting(
    features: Tensor, bank_features: Tensor, bank_probs: Tensor, num_valid: Tensor | int,
    num_neighbors: int = 10, distance: str = "cosine",
) -> tuple[Tensor, Tensor]:
    """AdaContrast's pseudo-label refinement: each row of ``features`` (B, D) takes the mean
    of the probabilities ``bank_probs`` (N, C) of its ``num_neighbors`` nearest rows of
    ``bank_features`` (N, D) (unweighted soft voting). Only the first ``num_valid`` rows count
    (a 0-dim tensor: no host sync); with fewer valid rows than neighbours, the mean is over
    the valid ones. Returns the refined labels (B,) and probabilities (B, C)."""
    with torch.autocast(features.device.type, enabled=False):
        features, bank_features = features.float(), bank_features.float()
        if distance == "cosine":
            closeness = F.normalize(features, dim=1) @ F.normalize(bank_features, dim=1).T
        else:
            closeness = -torch.cdist(features, bank_features)
        valid = torch.arange(bank_features.shape[0], device=features.device) < num_valid
        closeness = closeness.masked_fill(~valid, float("-inf"))
        nearest = closeness.topk(min(num_neighbors, bank_features.shape[0]), dim=1).indices
        weight = valid[nearest].float().unsqueeze(2)
        probs = (bank_probs[nearest].float() * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    return probs.argmax(1), probs


def contrastive_logits(
    query: Tensor, key: Tensor, queue: Tensor, temperature: float,
    labels: Tensor | None = None, queue_labels: Tensor | None = None,
) -> Tensor:
    """MoCo's instance logits, (B, 1 + K) in float32: the positive pair ``query_i . key_i``
    first, then ``query_i`` against every queued key (``queue``: (K, D)), over ``temperature``;
    ``query`` is normalised here, ``key`` and ``queue`` are unit rows already. With ``labels``
    (B,) and ``queue_labels`` (K,), the negatives of the query's own pseudo-label are -inf
    (AdaContrast's class-aware contrast); the positive is never masked."""
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=1)
        positive = (q * key.float()).sum(1, keepdim=True)
        negative = q @ queue.float().T
        if labels is not None:
            negative = negative.masked_fill(labels[:, None] == queue_labels[None, :], float("-inf"))
        return torch.cat([positive, negative], dim=1) / temperature


@contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Within the block every module of ``model`` is in train mode, as under the
    official code's ``model.train()``: dropout and stochastic depth active, BatchNorm
    normalising by each batch and moving its running statistics toward it (by the
    layer's momentum; tta's test-statistics layers read the batch either way)."""
    layers = [m for m in model.modules() if not m.training]
    # train(False) also reaches a layer's sub-modules: those in train mode before the
    # block (set so by the user, e.g. MC dropout) are put back after it
    kept = [m for m in model.modules() if m.training]
    for m in layers:
        m.train(True)
    try:
        yield
    finally:
        for m in layers:
            m.train(False)
        for m in kept:
            m.training = True


@register_method("adacontrast")
class AdaContrast(TTAMethod):
    """AdaContrast. Defaults are the official online code's CIFAR-10-C setting
    (mariodoebler/test-time-adaptation, conf.py and cfgs/cifar10_c/adacontrast.yaml,
    batch 200): SGD (momentum 0.9, Nesterov, weight decay 1e-4) lr 2e-4 on every
    weight, queue and bank of 16384, key momentum 0.999, temperature 0.07, 10 cosine
    neighbours, the three losses weighted 1, a 1024-image warm-up. The authors' code
    (DianCh/AdaContrast) has the same values. The adaptation passes run the model
    and the key encoder in train mode (dropout active), the prediction in eval mode.

    Per batch: the model on the weak view (pseudo-labels), on a strong view (the
    query, with gradient), the key encoder on another strong view (the key) and on
    the weak view (the bank's entries), one backward, and the model on the batch
    itself for the reported prediction, after the step.

    Needs the model's features and last layer (:mod:`tta.methods.features`: every
    ``tta.load_model`` image model, timm network, and network that ends with an ``nn.Linear``).

    Args:
        queue_size: keys in the contrastive queue (the negatives); starts with random
            unit vectors and random labels, as MoCo's.
        bank_size: entries (features, probabilities) of the neighbour bank; it starts
            empty and fills first-in, first-out. As the official bank, which grows by
            whole batches, it holds the first multiple of the batch size at or above
            ``bank_size`` (16400 at batch 200; the first batch's size counts).
        key_momentum: the key encoder's EMA momentum over the model's parameters.
        temperature: of the contrastive logits.
        num_neighbors: neighbours in the soft voting.
        distance: ``"cosine"`` or ``"euclidean"``, between features for the voting.
        warmup_samples: images seen before the pseudo-labels are refined (before,
            they are the plain argmax of the weak view); 0 refines from the second batch.
        class_aware: leave out the negatives whose pseudo-label is the query's.
        ce_weight: weight of the cross-entropy of the strong view to the pseudo-labels.
        contrastive_weight: weight of the contrastive loss.
        diversity_weight: weight of the diversity loss (minus the entropy of the mean prediction).
        bn_mode: the BatchNorm statistics of the reported prediction. The adaptation
            passes normalise each view by its own batch either way (so both modes
            adapt alike). ``"running"`` (the official code): those passes run in train
            mode and move the running statistics (momentum 0.1 by default) toward
            the augmented views', and the prediction normalises with them.
            ``"batch"``: the prediction normalises by the test batch and the running
            statistics stay the source's (as the other methods); on the 8-corruption
            CIFAR-10-C stream of RESULTS.md 36.7% error against 42.1% for "running".
            No difference on GroupNorm/LayerNorm models.
        weak_transform, strong_transform: the views, modules on (N, 3, H, W) batches
            in [0, 1] with per-image randomness, e.g. ``kornia.augmentation``
            pipelines (defaults: :func:`adacontrast_weak_augmentation`,
            :func:`adacontrast_strong_augmentation`). The two strong views are two
            calls of ``strong_transform``.

    Presets: ``"cifar10"`` is these defaults (batch 200); ``"imagenet"`` the
    ImageNet-C setting (cfgs/imagenet_c/adacontrast.yaml), the same values at batch 64.
    """

    adapts_norm_params = False
    batch_stats = False  # the default bn_mode "running" keeps BatchNorm as it is
    record_type = AdaContrastRecord
    updated_copies = ("key_encoder",)
    presets = {"cifar10": {}, "imagenet": {}}

    def __init__(
        self,
        model: nn.Module,
        *,
        queue_size: int = 16384,
        bank_size: int = 16384,
        key_momentum: float = 0.999,
        temperature: float = 0.07,
        num_neighbors: int = 10,
        distance: str = "cosine",
        warmup_samples: int = 1024,
        class_aware: bool = True,
        ce_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        diversity_weight: float = 1.0,
        bn_mode: str = "running",
        weak_transform: nn.Module | None = None,
        strong_transform: nn.Module | None = None,
        optimizer: str = "sgd",
        lr: float = 2e-4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        **kwargs,
    ) -> None:
        check_feature_split(model, "adacontrast")
        if bn_mode not in BN_MODES or distance not in DISTANCES:
            raise ValueError(f"bn_mode must be one of {BN_MODES} and distance one of {DISTANCES}, "
                             f"got {bn_mode!r}, {distance!r}")
        if min(queue_size, bank_size, num_neighbors) < 1 or warmup_samples < 0 or temperature <= 0 \
                or not 0.0 <= key_momentum <= 1.0:
            raise ValueError("queue_size, bank_size, num_neighbors must be >= 1, warmup_samples >= 0, temperature > 0 "
                             f"and key_momentum in [0, 1], got {queue_size}, {bank_size}, {num_neighbors}, "
                             f"{warmup_samples}, {temperature}, {key_momentum}")
        check_transform(weak_transform, "weak_transform")
        check_transform(strong_transform, "strong_transform")
        # Read by the base's __init__: "batch" switches BatchNorm to test statistics.
        self.batch_stats = bn_mode == "batch"
        super().__init__(model, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)
        self.queue_size, self.bank_size, self.key_momentum = queue_size, bank_size, key_momentum
        self.temperature, self.num_neighbors, self.distance = temperature, num_neighbors, distance
        self.warmup_samples, self.class_aware, self.bn_mode = warmup_samples, class_aware, bn_mode
        self.ce_weight, self.contrastive_weight, self.diversity_weight = ce_weight, contrastive_weight, diversity_weight
        self.weak_transform = weak_transform if weak_transform is not None else adacontrast_weak_augmentation()
        self.strong_transform = (strong_transform if strong_transform is not None
                                 else adacontrast_strong_augmentation())
        # The key encoder follows the model by EMA. It runs in train mode, as the official one
        # (dropout active; in "running" mode BatchNorm's running statistics move, unread).
        self.key_encoder = frozen_copy(self.model).train()
        device = next(self.model.parameters()).device
        # Queue (keys, pseudo-labels) and bank (features, probabilities): empty until the first batch
        # gives their sizes. One counter drives both rings and the warm-up: the images adapted on.
        self.register_buffer("queue_keys", torch.empty(0, device=device))
        self.register_buffer("queue_labels", torch.empty(0, dtype=torch.long, device=device))
        self.register_buffer("bank_features", torch.empty(0, device=device))
        self.register_buffer("bank_probs", torch.empty(0, device=device))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long, device=device))

    def select_params(self) -> list[tuple[str, nn.Parameter]]:
        # The official online code's: every parameter named weight or bias (a ViT's
        # class token and position embedding stay frozen).
        return select_weights_and_biases(self.model)

    def _allocate(self, features: Tensor, logits: Tensor) -> None:
        """Size the queue and bank on the first batch (a shape check, no sync)."""
        if self.queue_keys.dim() == 2:
            return
        dim, classes, device = features.shape[1], logits.shape[1], features.device
        dtype = torch.promote_types(features.dtype, torch.float32)
        self.queue_keys = F.normalize(torch.randn(self.queue_size, dim, device=device, dtype=dtype), dim=1)
        self.queue_labels = torch.randint(0, classes, (self.queue_size,), device=device)
        # The official bank grows by whole batches until it holds at least bank_size entries
        # (16400 at batch 200), then wraps: the first batch's multiple at or above bank_size.
        rows = -(-self.bank_size // features.shape[0]) * features.shape[0]
        self.bank_features = torch.zeros(rows, dim, device=device, dtype=dtype)
        self.bank_probs = torch.zeros(rows, classes, device=device, dtype=dtype)
        self.num_seen = self.num_seen.to(device)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        batch = x.shape[0]
        if batch > min(self.queue_size, self.bank_size):
            raise ValueError(f"adacontrast: a batch of {batch} images does not fit the queue ({self.queue_size}) "
                             f"or the bank ({self.bank_size}); raise queue_size/bank_size")
        weak, query_view, key_view = self.weak_transform(x), self.strong_transform(x), self.strong_transform(x)
        with train_mode(self.model):
            with torch.no_grad():
                weak_features, weak_logits = features_and_logits(self.model, weak)
            query_features, query_logits = features_and_logits(self.model, query_view)
        self._allocate(weak_features, weak_logits)

        with torch.no_grad():
            # Pseudo-labels: the neighbours' vote once the warm-up is over (and the
            # bank holds something), else the argmax; chosen on the device.
            voted, _ = knn_soft_voting(weak_features, self.bank_features, self.bank_probs, self.num_seen,
                                       self.num_neighbors, self.distance)
            refined = (self.num_seen >= self.warmup_samples) & (self.num_seen > 0)
            labels = torch.where(refined, voted, weak_logits.argmax(1))
        with torch.no_grad():
            # The key encoder follows the model as it is before this step's update.
            ema_update_(self.key_encoder.parameters(), self.model.parameters(), self.key_momentum)
            keys = F.normalize(pooled_features(self.key_encoder, key_view).float(), dim=1)
            keys = keys.to(self.queue_keys.dtype)
            slots = (self.num_seen + torch.arange(batch, device=x.device)) % self.queue_keys.shape[0]
            # As both official codes: the class-aware mask reads the queue's labels
            # after this batch is enqueued, the logits its keys from before.
            labels_after = self.queue_labels.index_copy(0, slots, labels)

        instance = contrastive_logits(query_features, keys, self.queue_keys, self.temperature,
                                      labels if self.class_aware else None, labels_after)
        ce_loss = F.cross_entropy(query_logits.float(), labels)
        contrastive_loss = F.cross_entropy(instance, torch.zeros_like(labels))
        mean_probs = query_logits.float().softmax(1).mean(0)
        diversity_loss = (mean_probs * torch.log(mean_probs + 1e-8)).sum()  # minus the entropy of the mean
        loss = (self.ce_weight * ce_loss + self.contrastive_weight * contrastive_loss
                + self.diversity_weight * diversity_loss)
        self.backward(loss)
        self.step()

        with torch.no_grad():
            # Enqueue after the backward (the logits' graph holds the old queue).
            self.queue_keys.index_copy_(0, slots, keys)
            self.queue_labels.copy_(labels_after)
            # The bank takes the key encoder's features and probabilities of the weak view.
            bank_features, bank_logits = features_and_logits(self.key_encoder, weak)
            rows = (self.num_seen + torch.arange(batch, device=x.device)) % self.bank_features.shape[0]
            self.bank_features.index_copy_(0, rows, bank_features.to(self.bank_features.dtype))
            self.bank_probs.index_copy_(0, rows, bank_logits.float().softmax(1).to(self.bank_probs.dtype))
            self.num_seen += batch
            # The prediction, after the update: in "running" mode with the running statistics.
            logits = self.model(x)
        record = AdaContrastRecord(num_samples=batch, num_selected=batch, loss=loss.detach(), refined=refined,
                                   ce_loss=ce_loss.detach(), contrastive_loss=contrastive_loss.detach(),
                                   diversity_loss=diversity_loss.detach())
        return logits, record
