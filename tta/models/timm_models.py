"""The ``timm:`` model family: any timm model as a pixel-space classifier
(``load_model("timm:resnet50")``). timm is imported on first use."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .._registry import unknown_name_message
from .checkpoint import load_checkpoint, load_state_into
from .classifier import ImageClassifier
from .registry import register_model_family

__all__ = ["timm_classifier"]


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

    from . import timm_cifar  # noqa: F401  (registers tta_cifar_* with timm)

    # is_model: also the deprecated names timm.create_model still maps to their successors
    if not (timm.models.is_model(name) or timm.models.is_model(name.split(".")[0])):
        raise KeyError(unknown_name_message("timm model", name, timm.list_models(),
                                            list_with="tta.list_models('timm:*')"))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained and weights is None and not kwargs.get("pretrained_cfg_overlay"):
        _check_weights_reachable(name, kwargs.get("cache_dir"))
    net = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    if weights is not None:
        load_state_into(net, load_checkpoint(weights), str(weights))
    cfg = net.pretrained_cfg or {}
    size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    # a transformer built for another size (img_size=...) takes that size: timm's
    # pretrained config keeps the one its weights were trained at
    built = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if built is not None:
        size = (built, built) if isinstance(built, int) else tuple(built)
    return ImageClassifier(
        net,
        net.num_classes,
        cfg.get("mean", (0.485, 0.456, 0.406)),
        cfg.get("std", (0.229, 0.224, 0.225)),
        input_size=size,
    )


def _check_weights_reachable(name: str, cache_dir: str | None) -> None:
    """Fail at once, with the local-checkpoint advice, when timm's weights for
    ``name`` are neither cached nor downloadable."""
    import torch
    from timm.models import get_pretrained_cfg

    from .hub import file_cached, hub_endpoint, hub_file_cached, refuse_if_unreachable

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unusual name: timm's own errors apply
        return
    if cfg is None or cfg.file:
        return
    hub, url = cfg.hf_hub_id or "", cfg.url or ""
    cached_hub = hub and hub_file_cached(
        hub, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"),
        cache_dir)
    cached_url = url and file_cached(Path(torch.hub.get_dir()) / "checkpoints", url)
    if cached_hub or cached_url or not (hub or url):
        return
    refuse_if_unreachable(
        f"timm:{name}", hub_endpoint() if hub else url, f"the Hugging Face hub ({hub})" if hub else url,
        f"Offline, give a local checkpoint: tta.load_model('timm:{name}', weights='path') "
        "(tta-bench: model.weights=path), or model.pretrained=false for random weights; or load it once "
        "where the network allows, and it is cached",
    )


def list_timm(pattern: str = "*") -> list[str]:
    """timm's model names matching ``pattern`` (``timm.list_models``; with a pretrained
    tag, ``"resnet50.a1_in1k"``, its pretrained weights)."""
    import timm

    return timm.list_models(pattern or "*", pretrained="." in pattern)


register_model_family("timm", timm_classifier, list_timm)
