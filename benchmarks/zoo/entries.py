"""The zoo's entries: for each model a builder of its starting point (an
``ImageClassifier``, float RGB in [0, 1] in, normalisation inside) and its default
hyper-parameters. Adding a zoo model = adding an entry here and its architecture to
``tta.models.zoo``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

import tta


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
