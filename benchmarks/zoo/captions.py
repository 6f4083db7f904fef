"""Contrastive image-text training of the zoo's CLIP models: captions from the
class names and CLIP's templates, edits of the image that some captions describe,
the UniCL loss, and the LiT phase with the image tower locked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gray(x: Tensor, g: torch.Generator) -> Tensor:
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return luma.expand_as(x)


def _dark(x: Tensor, g: torch.Generator) -> Tensor:
    return x * torch.empty(x.shape[0], 1, 1, 1).uniform_(0.25, 0.5, generator=g)


def _close_up(x: Tensor, g: torch.Generator) -> Tensor:
    from tta.augment.views import random_resized_crops

    return random_resized_crops(x, scale=(0.2, 0.4), flip_p=0.0, generator=g)


def _small(x: Tensor, g: torch.Generator) -> Tensor:
    side = int(torch.randint(12, 21, (), generator=g))
    pad = x.shape[-1] - side
    left = int(torch.randint(0, pad + 1, (), generator=g))
    top = int(torch.randint(0, pad + 1, (), generator=g))
    small = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.pad(small, (left, pad - left, top, pad - top), value=0.5)


# edit -> (image transform, the captions that describe it). Each applies to 1/8 of a
# batch; the other half gets a neutral template.
ATTRIBUTES: dict[str, tuple[Callable[[Tensor, torch.Generator], Tensor], list[str]]] = {
    "black and white": (_gray, ["a black and white photo of a {}.", "a black and white photo of the {}."]),
    "dark": (_dark, ["a dark photo of a {}.", "a dark photo of the {}."]),
    "close-up": (_close_up, ["a close-up photo of a {}.", "a close-up photo of the {}.", "a cropped photo of a {}."]),
    "small": (_small, ["a photo of a small {}.", "a photo of the small {}."]),
}
# CLIP's templates that say nothing about how the image looks
_NOT_NEUTRAL = ("black and white", "dark", "bright", "cropped", "close-up", "small", "big", "large", "blurry",
                "pixelated", "low resolution", "jpeg", "bad", "hard to see", "clean", "dirty", "weird", "nice", "cool")


@dataclass
class Captions:
    tokens: Tensor  # (classes, templates, context)
    groups: list[Tensor]  # template indices per group: neutral first, then one per attribute
    transforms: list[Callable[[Tensor, torch.Generator], Tensor] | None]


def make_captions(model: nn.Module, attributes: bool) -> Captions:
    """Every caption (class name x template) as token ids, grouped by what it says."""
    from tta.models.clip import prompt_templates

    templates = prompt_templates("clip80")
    groups_text = [templates]
    transforms: list = [None]
    if attributes:
        groups_text = [[t for t in templates if not any(w in t for w in _NOT_NEUTRAL)]]
        for transform, texts in ATTRIBUTES.values():
            groups_text.append(texts)
            transforms.append(transform)
    flat = [t for group in groups_text for t in group]
    sizes = torch.tensor([len(g) for g in groups_text])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
    groups = [torch.arange(int(a), int(a + n)) for a, n in zip(starts, sizes)]
    texts = [t.format(name) for name in model.classnames for t in flat]
    tokens = model.tokenizer(texts).view(len(model.classnames), len(flat), -1)
    return Captions(tokens, groups, transforms)


def caption_batch(x: Tensor, captions: Captions, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Apply the edits (half the batch keeps its image and gets a neutral caption)
    and draw one template per image from its group. Returns the images, template
    indices and groups."""
    b, n_groups = x.shape[0], len(captions.groups)
    if n_groups == 1:
        group = torch.zeros(b, dtype=torch.long)
    else:
        edited = torch.rand(b, generator=generator) < 0.5
        group = torch.where(edited, torch.randint(1, n_groups, (b,), generator=generator), 0)
        out = x
        for gi in range(1, n_groups):
            mask = (group == gi).view(-1, 1, 1, 1)
            out = torch.where(mask, captions.transforms[gi](x, generator), out)
        x = out
    template = torch.empty(b, dtype=torch.long)
    for gi, indices in enumerate(captions.groups):
        mask = group == gi
        template[mask] = indices[torch.randint(0, len(indices), (int(mask.sum()),), generator=generator)]
    return x, template, group


def contrastive_loss(model: nn.Module, x: Tensor, y: Tensor, captions: Captions,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Symmetric CLIP loss with same-class captions as positives (UniCL); also the
    image-to-class logits against the batch's captions, for the train accuracy.
    A caption of the right class but the wrong edit ("a dark photo of a cat" for an
    unedited cat) is a negative: that is what makes the text tower read more than
    the class name."""
    x, template, group = caption_batch(x, captions, generator)
    tokens = captions.tokens
    image = model.encode_image(x)
    text = F.normalize(model.clip.encode_text(tokens[y, template]).float(), dim=-1)
    logits = model.logit_scale * image @ text.t()
    positives = ((y[:, None] == y[None, :]) & (group[:, None] == group[None, :])).float()
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric: rows = columns
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    class_logits = torch.full((y.shape[0], len(model.classnames)), -torch.inf).scatter_reduce_(
        1, y.expand(y.shape[0], -1), logits.detach(), "amax", include_self=False)
    return loss, class_logits


def set_image_locked(model: nn.Module, locked: bool) -> None:
    """LiT: freeze the CLIP image trunk, BN statistics included, but its projection."""
    trunk = model.clip.visual.trunk
    for name, p in trunk.named_parameters():
        p.requires_grad_(not locked or name.startswith("linear."))
    trunk.train(not locked and model.training)
