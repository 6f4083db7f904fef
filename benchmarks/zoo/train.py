"""Train (or fine-tune) a model of tta's offline model zoo on the shared CIFAR-10 JPEGs.

    TTA_HOME=../shared python benchmarks/zoo/train.py resnet20_bn_jpeg --epochs 10

Plain PyTorch, CPU-friendly and seeded. The train split is decoded once into a uint8
tensor in memory; augmentation (random crop with 4-px zero padding, horizontal flip;
AugMix on top for entries that ask for it) runs on whole batches of tensors.
Schedule: a short linear warm-up (``--warmup-steps``), then cosine decay of the
learning rate to 0, stepped every batch.

Classifiers: cross-entropy; SGD, momentum 0.9, Nesterov, weight decay (on conv/linear
weights; none on norm parameters and biases). ``vit_tiny_ln`` (a ViT from scratch):
AdamW, weight decay 0.05 (none on norms, biases and the position embedding), half
of the tokens dropped at random in each training step (PatchDropout), and the loss
half cross-entropy, half KL to a teacher's (``zoo:resnet20_bn_jpeg``) softmax on the
same augmented batch (``--distill-weight``). Any classifier can be given a teacher
(``--teacher zoo:NAME``, e.g. to regularise a net that fits its train split far
better than its test split; several names distil from their mean softmax) and label
smoothing (``--label-smoothing``); an option an entry has no use for is refused.
``--teacher-targets fixed`` computes the teacher's targets once, before training, on
each un-augmented train image and its mirror image (averaged; cached in the work dir)
instead of on every augmented batch: a slow or ensemble teacher then costs one pass
over the train split instead of one per epoch, and its target is flip-invariant.
``--swa-epochs N`` (stochastic weight averaging, Izmailov et al. 2018) holds the
learning rate at ``--swa-lr`` for the last N epochs, averages the weights reached at
the end of each, recomputes the BatchNorm statistics of that average on one pass
over the train split, and evaluates and exports the average.

CLIP models (``clip_small``, ``clip_base``): an open_clip ``CLIP`` whose image tower is
a CIFAR ResNet initialised from trained weights, and a text tower trained from
scratch on captions made from the class names and CLIP's 80 templates (one random
template per image and step). With class names and neutral templates only, a text
tower learns to ignore everything but the class name, and a learnable prompt (TPT,
RLCF) then has nothing to act on. ``clip_small`` (the policy) therefore also learns
from captions that describe an edit made to the image (``ATTRIBUTES``: black and
white, dark, close-up, small; none of them a benchmark corruption), as real
captions describe more than the class. The loss is the symmetric image-text
contrastive loss with every caption of the batch that has the image's class (and,
for ``clip_small``, its edit) a positive (UniCL, Yang et al. 2022: with 10 classes
most of a batch shares a class). ``--locked-epochs`` first train with the
image tower locked except its projection (LiT, Zhai et al. 2022), so the random
text tower cannot wreck the trained image features; then everything trains, the
image tower at ``--image-lr``. AdamW (weight decay on matrices only).

The run is resumable: ``<work-dir>/last.pt`` (default ``outputs/zoo/<name>/``) holds
the model, optimiser, scheduler, epoch and RNG states and is written at the end of
every epoch (and when ``--max-steps`` stops a run); running the same command again
continues from it (``--restart`` ignores it).

``--init zoo:<name>`` starts from the weights of a model already in the zoo instead of
the entry's builder: a further stage of training with a fresh optimiser and schedule
(with ``zoo:<name>`` the same model, "train longer"). The manifest then keeps the
earlier stage's record (command, hyper-parameters, wall time, accuracy) under
``previous_stages``, and ``total_wall_time_s`` sums all stages.

Every record lists under ``inputs`` the trained weights the run read (where it
started and its teacher) by sha256: the zoo models build on one another
(``resnet26_gn``, ``clip_small`` and ``vit_tiny_ln``'s teacher are
``resnet20_bn_jpeg``), and retraining one must not rewrite the history of the others.
A resume refuses to go on with a teacher that was retrained in between.

At the end the script evaluates clean test accuracy (all 10k test images) and the
source error on the 8 severity-5 corruptions of ``benchmarks/methods_cifar10c.py``
(all 10k test images each, the same seeded stream), saves fp16 weights to
``benchmarks/zoo/checkpoints/<name>.pt`` and records everything in
``benchmarks/zoo/checkpoints/manifest.json``, which ``tta.load_model("zoo:<name>")``
reads.

Adding a zoo model = adding an entry to ``ZOO`` (a builder and default
hyper-parameters) and its architecture to ``tta.models.zoo``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/ for methods_cifar10c (stream, error rate)

import tta  # noqa: E402
from tta.augment.views import augmix  # noqa: E402
from tta.data import cifar10_dir, load_image_folder  # noqa: E402
from tta.paths import atomic_write_bytes  # noqa: E402
from methods_cifar10c import EIGHT, build_stream, error_rate  # noqa: E402

CHECKPOINT_DIR = HERE / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


# ----------------------------------------------------------------------------------
# Zoo entries: a builder returning an ImageClassifier (float RGB in [0, 1] in,
# normalisation inside) plus default hyper-parameters.
# ----------------------------------------------------------------------------------


@dataclass
class ZooEntry:
    build: Callable[[str | None], nn.Module]  # called with warm_start
    architecture: str  # key understood by tta.models.zoo (how to rebuild the net)
    description: str
    defaults: dict = field(default_factory=dict)
    clip: bool = False  # contrastive image-text training instead of cross-entropy
    augmix: bool = False  # AugMix (severity 3) after crop + flip
    attribute_captions: bool = False  # CLIP: captions that describe an applied edit
    optimizer: str = "sgd"  # classifiers: "sgd" or "adamw"
    teacher: str | None = None  # tta model name to distil from (its soft predictions on each batch)
    warm_start: str | None = None  # tta model name whose weights the builder starts from


def teacher_names(teacher: str | list[str] | None) -> list[str]:
    """The model names of a ``teacher`` hyper-parameter: one name, a list of names (an
    ensemble), or none."""
    if teacher is None:
        return []
    return [teacher] if isinstance(teacher, str) else list(teacher)


class MeanSoftmax(nn.Module):
    """The mean softmax of trained classifiers (a distillation target): with several,
    an ensemble whose errors are less correlated than any one member's."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.members = nn.ModuleList(tta.load_model(name).eval() for name in names)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x).softmax(1) for member in self.members]).mean(0)


@torch.no_grad()
def on_image_and_mirror(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 500,
                        desc: str | None = None) -> tuple[Tensor, Tensor]:
    """``fn`` on each uint8 image of ``x`` (as float RGB in [0, 1]) and on its mirror
    image, in batches: the two outputs, concatenated over ``x``."""
    plain, mirror = [], []
    for i in tqdm(range(0, x.shape[0], batch_size), desc=desc, mininterval=5, disable=desc is None):
        xb = x[i:i + batch_size].float().div_(255)
        plain.append(fn(xb))
        mirror.append(fn(xb.flip(3)))
    return torch.cat(plain), torch.cat(mirror)


def fixed_teacher_targets(teacher: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """``teacher``'s probabilities on each uint8 image of ``x`` and on its mirror image,
    averaged: one target per train image for all its augmented views. The 4-px crops
    of the augmentation barely move a CIFAR object; the flip is averaged out, so the
    student is not taught a left-right preference that the flip augmentation denies."""
    plain, mirror = on_image_and_mirror(teacher, x, batch_size, desc="teacher targets")
    return (plain + mirror) / 2


def _fine_tune(start: str | None) -> nn.Module:
    return tta.load_model(start)


def _resnet26_gn_from(start: str | None) -> nn.Module:
    """ResNet-26-GN started from a trained ResNet-20: its convolutions, norm affines
    and classifier fill blocks 0-2 of each stage; the fourth block of each stage is
    new, its last GroupNorm scale zero so that it starts as the identity (Goyal et al.
    2017). Renormalising per image instead of per batch changes every activation, so
    the copied weights are a warm start, not the answer."""
    from tta.models.classifier import ImageClassifier

    net = tta.models.CifarResNet(26, num_classes=10, norm="gn")
    own = net.state_dict()
    trained = {k: v for k, v in tta.load_model(start).backbone.state_dict().items()
               if k in own and own[k].shape == v.shape}  # drops BN running statistics
    net.load_state_dict(trained, strict=False)
    for stage in (net.layer1, net.layer2, net.layer3):
        nn.init.zeros_(stage[3].bn2.weight)
    return ImageClassifier(net, 10, input_size=(32, 32))


def _zoo_clip(arch: str) -> Callable[[str | None], nn.Module]:
    """A zoo CLIP whose image trunk starts from the convolutional weights of
    ``image_init`` (a tta model name); its projection and text tower start random."""

    def build(image_init: str | None) -> nn.Module:
        from tta.models.zoo import build_zoo_clip, zoo_clip_classifier

        clip_model, tokenizer = build_zoo_clip(arch)
        trained = tta.load_model(image_init).backbone.state_dict()
        trunk = clip_model.visual.trunk
        missing, unexpected = trunk.load_state_dict(
            {k: v for k, v in trained.items() if not k.startswith("linear.")}, strict=False)
        assert not unexpected and all(k.startswith("linear.") for k in missing), (missing, unexpected)
        return zoo_clip_classifier(clip_model, tokenizer)

    return build


def _vit_tiny_ln(start: str | None) -> nn.Module:
    assert start is None, "trained from scratch"
    return tta.load_model("zoo:vit_tiny_ln", pretrained=False)  # the zoo architecture, random weights


ZOO: dict[str, ZooEntry] = {
    "resnet20_bn_jpeg": ZooEntry(
        build=_fine_tune,
        warm_start="cifar10_resnet20",
        architecture="cifar_resnet20",
        description="the shared pretrained CIFAR-10 ResNet-20 (BatchNorm) fine-tuned "
                    "on the shared JPEG train split",
        defaults=dict(epochs=10, lr=0.04, batch_size=128, weight_decay=5e-4, warmup_steps=200),
    ),
    "resnet26_gn": ZooEntry(
        build=_resnet26_gn_from,
        warm_start="zoo:resnet20_bn_jpeg",
        architecture="cifar_resnet26_gn",
        description="CIFAR ResNet-26 with GroupNorm (8 groups), started from zoo:resnet20_bn_jpeg's "
                    "weights plus one identity-initialised block per stage, trained on the JPEG train split",
        defaults=dict(epochs=8, lr=0.05, batch_size=128, weight_decay=5e-4, warmup_steps=200),
    ),
    "vit_tiny_ln": ZooEntry(
        build=_vit_tiny_ln,
        architecture="timm_vit_tiny_patch4_cifar",
        description="ViT (timm config tta_vit_tiny_patch4_cifar: patch 4, width 192, depth 6, LayerNorm) "
                    "trained from scratch on the JPEG train split, distilled from zoo:resnet20_bn_jpeg",
        # ViTs from scratch on 50k images are data-hungry: a CNN teacher's soft labels
        # (DeiT, Touvron et al. 2021) and dropping half the tokens per training step
        # (PatchDropout, Liu et al. 2023: ~2x cheaper steps) buy accuracy per CPU-minute.
        defaults=dict(epochs=20, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_steps=780,
                      patch_drop=0.5, distill_weight=0.5),
        optimizer="adamw",
        teacher="zoo:resnet20_bn_jpeg",
    ),
    "clip_small": ZooEntry(
        build=_zoo_clip("clip_cifar_resnet20"),
        warm_start="zoo:resnet20_bn_jpeg",
        architecture="clip_cifar_resnet20",
        description="CLIP policy: image tower zoo:resnet20_bn_jpeg, 3-layer text transformer (width 48), "
                    "trained contrastively on the JPEG train split with CLIP-template captions",
        defaults=dict(epochs=3, locked_epochs=1, lr=2e-3, image_lr=2e-4, batch_size=128,
                      weight_decay=0.05, warmup_steps=100),
        clip=True,
        attribute_captions=True,
    ),
    "clip_base": ZooEntry(
        build=_zoo_clip("clip_cifar_resnet56"),
        warm_start="cifar10_resnet56",
        architecture="clip_cifar_resnet56",
        description="CLIP reward model: image tower the shared ResNet-56, 4-layer text transformer "
                    "(width 48), trained contrastively with AugMix on the JPEG train split",
        defaults=dict(epochs=4, locked_epochs=1, lr=2e-3, image_lr=5e-4, batch_size=128,
                      weight_decay=0.05, warmup_steps=100),
        clip=True,
        augmix=True,
    ),
}


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------


def evaluate(model: nn.Module, seed: int) -> dict:
    """Clean accuracy on the 10k test images and source error on the 8 severity-5
    corruptions of benchmarks/methods_cifar10c.py (10k images each, its seeded stream).
    CLIP models are scored zero-shot with the single prompt "a photo of a {}." (where
    TPT and RLCF start) and, on clean images, also with the 80-template ensemble."""

    model.eval()
    x, y = decode_split("test")
    clean_acc = 100.0 - error_rate(model, x, y)
    print(f"clean accuracy: {clean_acc:.2f}%", flush=True)
    extra = {}
    if hasattr(model, "clip"):
        from tta.models.zoo import zoo_clip_classifier

        ensemble = zoo_clip_classifier(model.clip, model.tokenizer, templates="clip80")
        extra["clean_accuracy_clip80_templates"] = round(100.0 - error_rate(ensemble, x, y), 2)
        print(f"clean accuracy, 80 templates: {extra['clean_accuracy_clip80_templates']:.2f}%", flush=True)
    errors = {}
    domains = build_stream(EIGHT, 10000, seed)
    for name, xc, yc in domains:
        errors[name] = error_rate(model, xc, yc)
        print(f"  {name}: {errors[name]:.2f}%", flush=True)
    return dict(
        clean_accuracy=round(clean_acc, 2),
        **extra,
        corruption_error_sev5={k: round(v, 2) for k, v in errors.items()},
        corruption_error_sev5_mean=round(statistics.mean(errors.values()), 2),
    )


# ----------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def export(name: str, entry: ZooEntry, model: nn.Module, record: dict) -> Path:
    """fp16 state_dict of the backbone (plain tensors) + a manifest entry."""
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    backbone = getattr(model, "backbone", None) or getattr(model, "clip", model)
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
        for k, v in backbone.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = CHECKPOINT_DIR / f"{name}.pt"
    atomic_write_bytes(path, data)
    path.chmod(0o644)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    manifest.setdefault("format", 1)
    manifest.setdefault("models", {})
    manifest["models"][name] = dict(
        file=path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        architecture=entry.architecture,
        description=entry.description,
        **record,
    )
    manifest["models"] = dict(sorted(manifest["models"].items()))
    atomic_write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    MANIFEST.chmod(0o644)
    return path


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, hold_from: int | None = None,
                   hold: float = 0.0):
    """Per-step learning-rate factor: linear warm-up over ``warmup_steps``, then cosine
    decay from 1 to ``hold`` by step ``hold_from`` (default: the last step), then
    ``hold`` to the end: SWA's constant phase, whose weights are averaged. A warm-up
    that reaches past ``hold_from`` ramps up to ``hold``, not to 1."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    end = total_steps if hold_from is None else hold_from

    def base(step: int) -> float:
        if step >= end:
            return hold
        t = (step - warmup_steps) / max(1, end - warmup_steps)
        return hold + (1.0 - hold) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps * base(warmup_steps)
        return base(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def swa_model(average: AveragedModel, batches: Iterable[Tensor]) -> nn.Module:
    """The weight average of an SWA run, ready to evaluate: the mean of the snapshots
    ``average`` collected, with BatchNorm running statistics recomputed on
    ``batches``, since the running statistics of no snapshot belong to the averaged
    weights (Izmailov et al. 2018). A net without BatchNorm (GN, LN) is unaffected."""
    model = average.module
    update_bn(batches, model)
    return model.eval()


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


def make_optimizer(model: nn.Module, entry: ZooEntry, hp: dict) -> torch.optim.Optimizer:
    if not entry.clip:
        # no decay on norm parameters, biases and a ViT's position embedding
        skip = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", set)()}
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in skip]
        other = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in skip]
        groups = [dict(params=decay, weight_decay=hp["weight_decay"]), dict(params=other, weight_decay=0.0)]
        if entry.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.999))
        return torch.optim.SGD(groups, lr=hp["lr"], momentum=0.9, nesterov=True)
    trunk = model.clip.visual.trunk
    image = [p for n, p in trunk.named_parameters() if not n.startswith("linear.")]
    image_ids = {id(p) for p in image}
    rest = [p for p in model.clip.parameters() if id(p) not in image_ids]
    groups = [
        dict(params=[p for p in image if p.ndim > 1], lr=hp["image_lr"], weight_decay=hp["weight_decay"]),
        dict(params=[p for p in image if p.ndim <= 1], lr=hp["image_lr"], weight_decay=0.0),
        dict(params=[p for p in rest if p.ndim > 1], lr=hp["lr"], weight_decay=hp["weight_decay"]),
        dict(params=[p for p in rest if p.ndim <= 1], lr=hp["lr"], weight_decay=0.0),
    ]
    return torch.optim.AdamW(groups, lr=hp["lr"], betas=(0.9, 0.98), eps=1e-6)


def init_stages(init: str, entry: ZooEntry) -> list[dict]:
    """The training stages behind zoo model ``init`` (its own record first), checked
    to be of ``entry``'s architecture: the provenance a further stage carries on."""
    from tta.models.zoo import zoo_info

    if not init.startswith("zoo:"):
        raise SystemExit(f"--init takes a zoo model (zoo:NAME), not {init!r}")
    info = zoo_info(init.removeprefix("zoo:"))
    if info["architecture"] != entry.architecture:
        raise SystemExit(f"--init {init} is a {info['architecture']}, this entry a {entry.architecture}")
    keys = ("training_command", "hyperparameters", "inputs", "epochs", "wall_time_s", "machine", "date",
            "sha256", "clean_accuracy", "corruption_error_sev5_mean")
    own = {k: info[k] for k in keys if k in info}
    return [own] + list(info.get("previous_stages", []))


def weights_sha256(name: str) -> str:
    """sha256 of the weights ``tta.load_model(name)`` reads (a zoo model or a shared
    CIFAR ResNet): a run's record names its inputs by content, since a zoo model that
    another was started from, or distilled from, may later be retrained."""
    from tta.models import cifar_resnet_weights
    from tta.models.zoo import zoo_info
    from tta.paths import sha256_of

    if name.startswith("zoo:"):
        return zoo_info(name.removeprefix("zoo:"))["sha256"]
    if name.startswith("cifar10_resnet"):
        return sha256_of(cifar_resnet_weights(int(name.removeprefix("cifar10_resnet"))))
    raise ValueError(f"no weights file known for {name!r}")


def run_inputs(entry: ZooEntry, init: str | None, teachers: list[str]) -> dict[str, str]:
    """The trained weights a run reads, name -> sha256: where it starts (``--init`` or
    the entry's warm start) and its teachers."""
    names = [init or entry.warm_start, *teachers]
    return {name: weights_sha256(name) for name in names if name}


# command-line options that override an entry's default hyper-parameter of the same name
TUNABLE = ("epochs", "lr", "batch_size", "weight_decay", "warmup_steps", "locked_epochs", "image_lr",
           "patch_drop", "distill_weight")


def _flag(key: str) -> str:
    """The command-line spelling of hyper-parameter ``key`` (``patch_drop`` -> ``--patch-drop``)."""
    return "--" + key.replace("_", "-")


def resolve_hparams(name: str, args: argparse.Namespace) -> dict:
    """``name``'s default hyper-parameters with the command line's overrides. An option
    the entry has no use for (``--patch-drop`` for a ResNet) is an error rather than
    silently ignored, since the record would then claim a recipe that never ran.
    ``--teacher`` and ``--label-smoothing`` add to a classifier's recipe (as
    ``teacher``, with ``distill_weight`` 0.5 unless given, and ``label_smoothing``);
    ``--teacher-targets`` to that of a classifier with a teacher; ``--swa-epochs`` (with
    ``swa_lr`` half the peak lr unless given) to any classifier's."""
    entry = ZOO[name]
    hp = dict(entry.defaults)
    teachers = args.teacher
    added = {"teacher": teachers[0] if teachers and len(teachers) == 1 else teachers,
             "teacher_targets": args.teacher_targets, "label_smoothing": args.label_smoothing,
             "swa_epochs": args.swa_epochs, "swa_lr": args.swa_lr}
    for key, value in added.items():
        if value is None:
            continue
        if entry.clip:
            raise SystemExit(f"{_flag(key)}: {name} trains contrastively, not on labels")
        hp[key] = value
    if args.teacher is not None:
        hp.setdefault("distill_weight", 0.5)
    if args.teacher_targets is not None and not teacher_names(hp.get("teacher", entry.teacher)):
        raise SystemExit(f"--teacher-targets: {name} has no teacher (give one with --teacher)")
    for key in TUNABLE:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in hp:
            usable = ", ".join(_flag(k) for k in TUNABLE if k in hp)
            raise SystemExit(f"{_flag(key)} does not apply to {name} (it takes {usable}"
                             + ("" if entry.clip else "".join(f", {_flag(k)}" for k in added)) + ")")
        hp[key] = value
    if "swa_lr" in hp and "swa_epochs" not in hp:
        raise SystemExit("--swa-lr: give --swa-epochs too (how many of the last epochs to average)")
    if "swa_epochs" in hp:
        if not 1 <= hp["swa_epochs"] <= hp["epochs"]:
            raise SystemExit(f"--swa-epochs {hp['swa_epochs']}: must be between 1 and the run's {hp['epochs']} epochs")
        hp.setdefault("swa_lr", hp["lr"] / 2)  # the SWA paper's constant lr on CIFAR, half the initial one
    return hp


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--locked-epochs", type=int, default=None, help="CLIP: epochs with the image tower locked")
    parser.add_argument("--image-lr", type=float, default=None, help="CLIP: learning rate of the image tower")
    parser.add_argument("--patch-drop", type=float, default=None, help="ViT: fraction of tokens dropped per step")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="weight of the KL to the teacher's predictions (the rest on the labels)")
    parser.add_argument("--teacher", default=None, nargs="+", metavar="MODEL",
                        help="classifiers: distil from this tta model (e.g. zoo:resnet20_bn_jpeg), "
                             "or from the mean softmax of several, instead of the entry's teacher (if any)")
    parser.add_argument("--teacher-targets", default=None, choices=("batch", "fixed"),
                        help="batch (default): the teacher's softmax on each augmented batch; fixed: "
                             "on each un-augmented train image and its mirror, computed once")
    parser.add_argument("--label-smoothing", type=float, default=None,
                        help="classifiers: label smoothing of the cross-entropy (default 0)")
    parser.add_argument("--swa-epochs", type=int, default=None, metavar="N",
                        help="classifiers: stochastic weight averaging: the last N epochs run at the "
                             "constant --swa-lr and the model exported is the average of their weights "
                             "(BatchNorm statistics recomputed)")
    parser.add_argument("--swa-lr", type=float, default=None,
                        help="the constant learning rate of the SWA epochs (default: half of --lr)")
    parser.add_argument("--init", default=None, metavar="zoo:NAME",
                        help="start from this zoo model's weights (a further training stage) "
                             "instead of the entry's builder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default outputs/zoo/<name>/")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimiser steps (timing runs); "
                             "saves the resume checkpoint, skips evaluation and export")
    parser.add_argument("--restart", action="store_true", help="ignore an existing resume checkpoint")
    parser.add_argument("--no-export", action="store_true", help="evaluate but do not write checkpoints/")
    return parser


def main() -> None:
    args = make_parser().parse_args()

    entry = ZOO[args.name]
    hp = resolve_hparams(args.name, args)
    teachers = teacher_names(hp.get("teacher", entry.teacher))
    previous_stages = []
    inputs = run_inputs(entry, args.init, teachers)
    if args.init is not None:
        previous_stages = init_stages(args.init, entry)
        hp["init"] = args.init  # part of the hyper-parameters: a resume must start from the same weights
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work_dir = Path(args.work_dir or Path("outputs") / "zoo" / args.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    resume_path = work_dir / "last.pt"
    command = "python benchmarks/zoo/train.py " + " ".join(sys.argv[1:])

    t0 = time.perf_counter()
    x_train, y_train = decode_split("train")
    print(f"decoded {x_train.shape[0]} train images in {time.perf_counter() - t0:.0f} s", flush=True)
    steps_per_epoch = x_train.shape[0] // hp["batch_size"]  # drop the last partial batch
    total_steps = steps_per_epoch * hp["epochs"]

    model = tta.load_model(args.init).train() if args.init else entry.build(entry.warm_start)
    if hp.get("patch_drop"):
        from timm.layers import PatchDropout

        # training only (PatchDropout is the identity in eval mode); no parameters, so
        # the exported state_dict is that of the plain architecture
        model.backbone.patch_drop = PatchDropout(hp["patch_drop"], num_prefix_tokens=0)
    teacher = MeanSoftmax(teachers) if teachers else None
    optimizer = make_optimizer(model, entry, hp)
    swa_epochs = hp.get("swa_epochs", 0)
    swa_start = hp["epochs"] - swa_epochs  # epochs before the averaged ones
    # without SWA: hold from the last step at 0, i.e. plain cosine to 0
    scheduler = make_scheduler(optimizer, total_steps, hp["warmup_steps"], hold_from=swa_start * steps_per_epoch,
                               hold=hp.get("swa_lr", 0.0) / hp["lr"])
    average = AveragedModel(model) if swa_epochs else None
    gen = torch.Generator().manual_seed(args.seed)

    epoch, step, train_seconds, ckpt = 0, 0, 0.0, {}
    if resume_path.exists() and not args.restart:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=True)
        if ckpt["hparams"] != hp:
            raise SystemExit(f"{resume_path} was made with {ckpt['hparams']}, not {hp}: "
                             f"pass the same options, or --restart")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        epoch, step, train_seconds = ckpt["epoch"], ckpt["step"], ckpt["train_seconds"]
        if average is not None:
            average.load_state_dict(ckpt["swa"])
        # read when the run began: by now the manifest may already hold this stage's export
        previous_stages = ckpt.get("previous_stages", previous_stages)
        started = ckpt.get("inputs", inputs)
        for name in teachers:
            if started.get(name, inputs[name]) != inputs[name] and epoch < hp["epochs"]:
                raise SystemExit(f"{name} was retrained since {resume_path} was started: "
                                 f"finishing with another teacher would mix two runs; pass --restart")
        inputs = started
        print(f"resumed from {resume_path}: epoch {epoch}, step {step}", flush=True)

    def save_resume(epoch_done: int, step_done: int, perm: Tensor | None = None) -> None:
        state = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), generator=gen.get_state(),
            torch_rng=torch.get_rng_state(), epoch=epoch_done, step=step_done,
            train_seconds=train_seconds, hparams=hp, previous_stages=previous_stages, inputs=inputs,
        )
        if perm is not None:
            state["perm"] = perm
        if average is not None:
            state["swa"] = average.state_dict()
        tmp = resume_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, resume_path)

    targets = None
    if teacher is not None and hp.get("teacher_targets") == "fixed" and epoch < hp["epochs"]:
        # cached: for an ensemble teacher this pass takes as long as a few epochs
        cache = work_dir / "teacher_targets.pt"
        teacher_inputs = {name: inputs[name] for name in teachers}
        cached = torch.load(cache, map_location="cpu", weights_only=True) if cache.exists() else {}
        if cached.get("inputs") == teacher_inputs and cached["targets"].shape[0] == x_train.shape[0]:
            targets = cached["targets"]
        else:
            t_targets = time.perf_counter()
            targets = fixed_teacher_targets(teacher, x_train)
            torch.save(dict(inputs=teacher_inputs, targets=targets), cache)
            print(f"teacher targets: {time.perf_counter() - t_targets:.0f} s, train accuracy "
                  f"{100 * (targets.argmax(1) == y_train).float().mean():.2f}%", flush=True)

    print(f"{args.name}: {hp}, {steps_per_epoch} steps/epoch, {args.threads} threads", flush=True)
    stopped = False
    # A --max-steps stop mid-epoch stores the epoch's permutation, so the resumed run
    # continues the same epoch where it stopped.
    pending_perm = ckpt.get("perm")
    captions = make_captions(model, entry.attribute_captions) if entry.clip else None
    while epoch < hp["epochs"] and not stopped:
        model.train()
        if entry.clip:
            set_image_locked(model, epoch < hp["locked_epochs"])
        perm = pending_perm if pending_perm is not None else torch.randperm(x_train.shape[0], generator=gen)
        pending_perm = None
        first = step - epoch * steps_per_epoch
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{hp['epochs']}",
                   initial=first, total=steps_per_epoch, mininterval=5)
        t_epoch = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for i in bar:
            idx = perm[i * hp["batch_size"]:(i + 1) * hp["batch_size"]]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            if entry.augmix:
                xb = augmix(xb, severity=3.0, generator=gen)
            if entry.clip:
                loss, logits = contrastive_loss(model, xb, yb, captions, gen)
            else:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=hp.get("label_smoothing", 0.0))
                if teacher is not None:
                    target = targets[idx] if targets is not None else teacher(xb)
                    kl = F.kl_div(logits.log_softmax(1), target, reduction="batchmean")
                    loss = (1 - hp["distill_weight"]) * loss + hp["distill_weight"] * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * yb.shape[0]
            correct += (logits.argmax(1) == yb).sum().item()
            seen += yb.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            lr=f"{max(scheduler.get_last_lr()):.4f}", refresh=False)
            if args.max_steps is not None and step >= args.max_steps:
                stopped = True
                break
        bar.close()
        elapsed = time.perf_counter() - t_epoch
        train_seconds += elapsed
        if stopped and step < (epoch + 1) * steps_per_epoch:
            save_resume(epoch, step, perm)
            print(f"stopped at step {step} (--max-steps): {elapsed / max(1, seen // hp['batch_size']):.3f} "
                  f"s/step, ~{elapsed / max(1, seen) * x_train.shape[0] / 60:.1f} min/epoch", flush=True)
            break
        epoch += 1
        if average is not None and epoch > swa_start:
            average.update_parameters(model)
        save_resume(epoch, step)
        print(f"epoch {epoch}: train loss {loss_sum / max(1, seen):.4f}, train acc "
              f"{100 * correct / max(1, seen):.2f}%, {elapsed:.0f} s", flush=True)
    if stopped:
        print("not evaluating or exporting: --max-steps run", flush=True)
        return

    if average is not None:
        t_bn = time.perf_counter()
        bn_gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(x_train.shape[0], generator=bn_gen)
        batches = (augment(x_train[order[i:i + hp["batch_size"]]], bn_gen)
                   for i in range(0, x_train.shape[0], hp["batch_size"]))
        model = swa_model(average, tqdm(batches, desc="SWA: BatchNorm statistics", mininterval=5,
                                        total=math.ceil(x_train.shape[0] / hp["batch_size"])))
        print(f"averaged the weights of the last {int(average.n_averaged)} epochs "
              f"({time.perf_counter() - t_bn:.0f} s for the BatchNorm statistics)", flush=True)

    t_eval = time.perf_counter()
    metrics = evaluate(model, args.seed)
    print(f"evaluation took {time.perf_counter() - t_eval:.0f} s", flush=True)
    record = dict(
        training_command=f"TTA_HOME=<shared> {command}",
        hyperparameters=dict(
            hp,
            optimizer="AdamW (0.9, 0.98)" if entry.clip else
                      "AdamW (0.9, 0.999)" if entry.optimizer == "adamw" else "SGD momentum 0.9 nesterov",
            **(dict(teacher=" + ".join(teachers) + (" (mean softmax)" if len(teachers) > 1 else "")
                    + (" (KL to its softmax on the un-augmented image and its mirror, averaged, computed once)"
                       if hp.get("teacher_targets") == "fixed" else
                       " (KL to its softmax on the same augmented batch)"))
               if teachers else {}),
            schedule=(f"linear warm-up, per-step cosine to swa_lr by epoch {swa_start}, then constant swa_lr; "
                      f"exported: the mean of the weights at the end of each of the last {swa_epochs} epochs "
                      "(SWA), BatchNorm statistics recomputed on one augmented pass over the train split"
                      if swa_epochs else "linear warm-up then per-step cosine to 0"),
            augmentation="random crop (4 px zero pad) + horizontal flip" + (" + AugMix severity 3" if entry.augmix else ""),
            **(dict(loss="symmetric contrastive, captions of the same class (and edit) positive (UniCL); "
                          "captions: CIFAR-10 class names x CLIP's 80 templates"
                          + (" (neutral ones) or x edit captions: " + ", ".join(ATTRIBUTES)
                             if entry.attribute_captions else ""),
                    locked="image tower locked but its projection for locked_epochs (LiT)") if entry.clip else {}),
            seed=args.seed),
        inputs=inputs,
        epochs=hp["epochs"],
        wall_time_s=round(train_seconds),
        **(dict(previous_stages=previous_stages,
                total_epochs=hp["epochs"] + sum(s["epochs"] for s in previous_stages),
                total_wall_time_s=round(train_seconds) + sum(s["wall_time_s"] for s in previous_stages))
           if previous_stages else {}),
        machine=dict(cpu=cpu_model(), threads=args.threads, torch=torch.__version__),
        date=datetime.date.today().isoformat(),
        **metrics,
    )
    if args.no_export:
        print(json.dumps(record, indent=2))
        return
    path = export(args.name, entry, model, record)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {MANIFEST}", flush=True)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
