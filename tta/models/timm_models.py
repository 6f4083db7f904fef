"""Any timm model as a pixel-space classifier."""

from __future__ import annotations

import os

from torch import nn

from .classifier import ImageClassifier


def timm_classifier(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(name)`` wrapped with the normalisation of its pretrained
    config. ``weights`` loads a local checkpoint (no download); otherwise
    ``pretrained=True`` fetches timm's weights (needs network or timm's cache)."""
    import timm

    from . import load_checkpoint, load_state_into
    from . import timm_cifar  # noqa: F401  (registers tta_cifar_* with timm)

    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        from .._registry import unknown_name_message

        raise KeyError(unknown_name_message("timm model", name, timm.list_models()))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    net = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    if weights is not None:
        load_state_into(net, load_checkpoint(weights), str(weights))
    cfg = net.pretrained_cfg or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return ImageClassifier(
        net,
        net.num_classes,
        cfg.get("mean", (0.485, 0.456, 0.406)),
        cfg.get("std", (0.229, 0.224, 0.225)),
        input_size=size,
    )
