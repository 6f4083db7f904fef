"""tta's CIFAR models registered as timm models (``timm.create_model("tta_cifar_resnet20")``),
so that timm-based code, open_clip's timm image towers among it, can build them: the
CIFAR ResNets, and a small ViT config for 32x32 images (``tta_vit_tiny_patch4_cifar``).

Importing this module registers them. ``load_model("timm:...")`` and the zoo's CLIP
models import it themselves; ``import tta`` alone does not, to stay free of timm. The
entrypoints build randomly initialised nets: pretrained CIFAR weights come through
``tta.load_model("cifar10_resnet20")`` or the zoo, not timm's hub.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from .cifar_resnet import CifarResNet, Norm
from .classifier import IMAGENET_MEAN, IMAGENET_STD

__all__: list[str] = []  # timm's register_model appends each entrypoint

_PRETRAINED_CFG = dict(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=10,
                       interpolation="bilinear", crop_pct=1.0, first_conv="conv1", classifier="linear")


def _create(depth: int, norm: Norm, pretrained: bool, num_classes: int = 10, global_pool: str = "avg",
            in_chans: int = 3, **kwargs: Any) -> CifarResNet:
    if pretrained:
        raise ValueError("timm hosts no weights for tta's CIFAR ResNets: use tta.load_model('cifar10_resnet20') "
                         "or a zoo model, or pass pretrained=False")
    if in_chans != 3:
        raise ValueError(f"tta's CIFAR ResNets take 3 input channels, got in_chans={in_chans}")
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    unknown = {k: v for k, v in kwargs.items() if v is not None}
    if unknown:
        raise TypeError(f"unexpected arguments for a CIFAR ResNet: {sorted(unknown)}")
    net = CifarResNet(depth, num_classes=0, norm=norm)
    net.reset_classifier(num_classes, global_pool)
    net.pretrained_cfg = net.default_cfg = dict(_PRETRAINED_CFG, architecture=f"tta_cifar_resnet{depth}")
    return net


@register_model
def tta_cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (BatchNorm), 32x32 inputs."""
    return _create(20, "bn", pretrained, **kwargs)


@register_model
def tta_cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (BatchNorm), 32x32 inputs."""
    return _create(56, "bn", pretrained, **kwargs)


@register_model
def tta_cifar_resnet26_gn(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-26 with GroupNorm (8 groups), 32x32 inputs."""
    return _create(26, "gn", pretrained, **kwargs)


# ViT-Tiny's width and heads at a depth and MLP ratio small enough for CPU training and
# an fp16 checkpoint under 4 MB. Patch 4 gives 64 tokens on 32x32 images. Averaging
# the tokens instead of a class token is the usual choice for ViTs trained from
# scratch on small data (Beyer et al. 2022, "Better plain ViT baselines").
_VIT_CIFAR = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0,
                  class_token=False, global_pool="avg", num_classes=10)


@register_model
def tta_vit_tiny_patch4_cifar(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT for 32x32 images: patch 4 (64 tokens), width 192, 6 blocks of 3 heads, MLP
    ratio 2, LayerNorm, mean-pooled tokens (no class token). Keyword arguments
    override the config as for any timm ViT (e.g. ``patch_drop_rate``)."""
    if pretrained:
        raise ValueError("timm hosts no weights for tta_vit_tiny_patch4_cifar: use tta.load_model('zoo:vit_tiny_ln'), "
                         "or pass pretrained=False")
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    net = VisionTransformer(**dict(_VIT_CIFAR, **{k: v for k, v in kwargs.items() if v is not None}))
    net.pretrained_cfg = net.default_cfg = dict(_PRETRAINED_CFG, architecture="tta_vit_tiny_patch4_cifar",
                                                first_conv="patch_embed.proj", classifier="head")
    return net
