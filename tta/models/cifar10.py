"""The registered CIFAR-10 ResNets ``cifar10_resnet{20,32,44,56}``: the checkpoints of
akamaster/pytorch_resnet_cifar10, cached under ``$TTA_HOME/models/cifar10``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from ..paths import download, sha256_of, tta_home
from .checkpoint import load_checkpoint, load_state_into
from .cifar_resnet import CifarResNet
from .classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier
from .registry import register_model

__all__ = ["cifar_resnet_weights"]

# depth -> sha256 prefix; the upstream file name is resnet<depth>-<prefix>.th
_SHA256_PREFIX = {
    20: "12fca82f",
    32: "d509ac18",
    44: "014dd654",
    56: "4bfd9763",
}
_FILES = {depth: f"resnet{depth}-{prefix}.th" for depth, prefix in _SHA256_PREFIX.items()}
_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


def cifar_resnet_weights(depth: int) -> Path:
    """Path of the pretrained checkpoint under ``$TTA_HOME/models/cifar10``, downloaded
    there if missing. Either way its sha256 is checked once (a cached file by this
    function, a fresh one by :func:`tta.paths.download`); a mismatch is a ``ValueError``."""
    filename = _FILES[depth]
    expected = _SHA256_PREFIX[depth]
    path = tta_home() / "models" / "cifar10" / filename
    if not path.exists():
        download(_URL + filename, path, sha256_prefix=expected)
    elif not (got := sha256_of(path)).startswith(expected):
        raise ValueError(
            f"{path} is corrupted: its sha256 {got[:16]}... does not start with {expected}. Delete it "
            f"(tta then downloads it again) or replace it by hand with {_URL + filename}"
        )
    return path


def _make_factory(depth: int) -> Callable[..., nn.Module]:
    def factory(weights: str | os.PathLike | None = None, pretrained: bool = True) -> nn.Module:
        net = CifarResNet(depth, num_classes=10)
        if weights is not None or pretrained:
            path = Path(weights) if weights is not None else cifar_resnet_weights(depth)
            load_state_into(net, load_checkpoint(path), str(path))
        return ImageClassifier(net, 10, IMAGENET_MEAN, IMAGENET_STD, input_size=(32, 32))

    factory.__doc__ = (
        f"CIFAR-10 ResNet-{depth}, pretrained unless ``pretrained=False``; ``weights`` "
        f"overrides the default $TTA_HOME/models/cifar10/{_FILES[depth]}."
    )
    return factory


for _depth in _FILES:
    register_model(f"cifar10_resnet{_depth}")(_make_factory(_depth))
