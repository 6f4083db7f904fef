"""The architectures of tta's offline zoo (:mod:`tta.models.zoo`), by the key a
manifest's ``architecture`` names: how to build each net with random weights, for
its checkpoint to be loaded into (and for ``benchmarks/zoo/train.py`` to train)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from torch import nn

from .cifar_resnet import CifarResNet
from .classifier import IMAGENET_MEAN, IMAGENET_STD
from .clip import CLIPClassifier, from_open_clip, import_open_clip

__all__ = ["ARCHITECTURES", "CLIP_ARCHITECTURES", "BUILTIN", "build_zoo_clip", "zoo_clip_classifier"]

# ImageClassifier arguments of every zoo classifier: CIFAR-10 pixels, normalised as the
# shared CIFAR ResNets' weights expect
_CIFAR10_INPUT: dict[str, Any] = dict(num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=(32, 32))


def _cifar_resnet(depth: int, norm: str = "bn") -> Callable[[], tuple[nn.Module, dict[str, Any]]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        return CifarResNet(depth, num_classes=10, norm=norm), dict(_CIFAR10_INPUT)

    return build


def _timm_cifar(name: str) -> Callable[[], tuple[nn.Module, dict[str, Any]]]:
    def build() -> tuple[nn.Module, dict[str, Any]]:
        import timm

        from . import timm_cifar  # noqa: F401  (registers tta's timm entrypoints)

        return timm.create_model(name, pretrained=False), dict(_CIFAR10_INPUT)

    return build


# architecture key (the manifest's "architecture") -> (backbone, ImageClassifier kwargs)
ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "cifar_resnet20": _cifar_resnet(20),
    "cifar_resnet26_gn": _cifar_resnet(26, "gn"),
    "timm_vit_tiny_patch4_cifar": _timm_cifar("tta_vit_tiny_patch4_cifar"),
}

# open_clip model configs of the zoo's CLIP models: a tta CIFAR ResNet (a timm
# entrypoint of tta.models.timm_cifar) as image tower, its ``linear`` the projection
# into the joint space, and a small text transformer. The token embedding (49408 x
# width, the CLIP BPE vocabulary) dominates the size, hence the narrow text width.
_CLIP_TEXT = dict(context_length=16, vocab_size=49408, width=48, heads=4)
CLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "clip_cifar_resnet20": dict(
        embed_dim=64,
        vision_cfg=dict(timm_model_name="tta_cifar_resnet20", timm_pool="avg", timm_proj="none", image_size=32),
        text_cfg=dict(_CLIP_TEXT, layers=3),
    ),
    "clip_cifar_resnet56": dict(
        embed_dim=64,
        vision_cfg=dict(timm_model_name="tta_cifar_resnet56", timm_pool="avg", timm_proj="none", image_size=32),
        text_cfg=dict(_CLIP_TEXT, layers=4),
    ),
}
# open_clip's preprocess_cfg: CIFAR pixels, normalised as the CIFAR ResNets' weights expect
_CLIP_PREPROCESS = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=32, interpolation="bilinear",
                        resize_mode="squash")

# Architecture of each zoo model, for when no manifest is available (a copy of tta
# without its bundled zoo folder, with only $TTA_HOME/models/zoo/<name>.pt).
BUILTIN: dict[str, str] = {
    "resnet20_bn_jpeg": "cifar_resnet20",
    "resnet26_gn": "cifar_resnet26_gn",
    "vit_tiny_ln": "timm_vit_tiny_patch4_cifar",
    "clip_small": "clip_cifar_resnet20",
    "clip_base": "clip_cifar_resnet56",
}


def build_zoo_clip(arch: str) -> tuple[nn.Module, Callable[..., Any]]:
    """A randomly initialised open_clip ``CLIP`` of zoo architecture ``arch`` and its
    tokenizer (CLIP's BPE at the config's context length)."""
    from . import timm_cifar  # noqa: F401  (registers the image towers with timm)

    oc = import_open_clip()
    cfg = copy.deepcopy(CLIP_ARCHITECTURES[arch])
    model = oc.CLIP(**cfg)
    model.visual.preprocess_cfg = dict(_CLIP_PREPROCESS)
    return model, oc.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def zoo_clip_classifier(model: nn.Module, tokenizer: Callable[..., Any], *,
                        classnames: str | Sequence[str] = "cifar10", templates: str | Sequence[str] = "photo",
                        ctx_init: str | None = None) -> CLIPClassifier:
    """A zoo CLIP as a :class:`~tta.models.clip.CLIPClassifier`: the zoo's classes,
    CIFAR-10, by default (``from_open_clip``'s are ImageNet's)."""
    return from_open_clip(model, tokenizer, classnames=classnames, templates=templates, ctx_init=ctx_init)
