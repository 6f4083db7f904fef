"""Models: ``load_model(name)`` returns a classifier taking float RGB in [0, 1]
(normalisation inside), ready to wrap with :func:`tta.wrap`.

One name grammar: a registered name (``list_models()``: the CIFAR-10 ResNets of
:mod:`tta.models.cifar10`), or ``"<family>:<model>"`` for a model family
(:mod:`tta.models.registry`):

- ``"timm:<any timm model>"`` (:mod:`tta.models.timm_models`);
- ``"clip:<open_clip model>/<pretrained tag or checkpoint path>"``, zero-shot CLIP
  classifiers (:mod:`tta.models.clip_models`);
- ``"zoo:<name>"``, tta's offline model zoo (:mod:`tta.models.zoo`).

A new family is one :func:`register_model_family` call in its own module, imported
below.
"""

from __future__ import annotations

from . import cifar10, clip_models, timm_models, zoo  # noqa: F401  (each registers its names)
from .checkpoint import load_checkpoint, load_state_into
from .cifar10 import cifar_resnet_weights
from .cifar_resnet import CifarResNet
from .classifier import ImageClassifier
from .registry import list_models, load_model, register_model, register_model_family

__all__ = [
    "ImageClassifier",
    "CifarResNet",
    "register_model",
    "register_model_family",
    "list_models",
    "load_model",
    "load_checkpoint",
    "load_state_into",
    "cifar_resnet_weights",
]
