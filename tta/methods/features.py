"""The feature/classifier split that methods learning on features use (RMT and
SANTA's prototypes and contrastive loss, AdaContrast's memory bank and MoCo keys):
``model.forward_features(x)`` gives the pooled (B, D) features the classifier
reads and ``model.get_classifier()`` the last layer (timm's interface; every
``tta.load_model`` image model has both)."""

from __future__ import annotations

from torch import nn

__all__ = ["FEATURE_SPLIT", "check_feature_split"]

FEATURE_SPLIT = ("forward_features", "get_classifier")


def check_feature_split(model: nn.Module, method: str) -> None:
    """Refuse a model that cannot give ``method`` its features, naming what it lacks."""
    missing = [name for name in FEATURE_SPLIT if not callable(getattr(model, name, None))]
    if not missing:
        try:
            head = model.get_classifier()
        except AttributeError:  # a wrapper whose network has no classifier to give
            head = None
        if not isinstance(head, nn.Module):
            missing = ["a get_classifier() that returns the last layer"]
    if missing:
        if callable(getattr(model, "text_features", None)):  # tta.models.clip.CLIPClassifier
            hint = ("A CLIP classifier's head is its class text features, not a layer: use tpt, rlcf, vte, "
                    "ttrv or an entropy method on it")
        else:
            hint = ("The CIFAR ResNets, timm and zoo classifiers of tta.load_model have both; wrap a timm "
                    "network in tta.models.ImageClassifier")
        raise TypeError(
            f"{method} learns on the model's features and needs model.forward_features(x) -> (B, D) and "
            f"model.get_classifier() -> the last layer; {type(model).__name__} lacks {' and '.join(missing)}. "
            + hint
        )
