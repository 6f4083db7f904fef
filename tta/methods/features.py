"""The feature/classifier split that methods learning on features use (RMT and
SANTA's prototypes and contrastive loss, AdaContrast's memory bank and MoCo keys,
LAME's affinities): :func:`pooled_features` gives the pooled (B, D) features the
classifier reads, :func:`classifier_head` the last layer and :func:`features_and_logits`
both the features and the logits, for the models of
``tta.load_model`` (``forward_features`` pooled) and for timm networks as timm
builds them (``forward_features`` unpooled, then ``forward_head``), two-headed
distilled ones included (:class:`~tta.models.classifier.MeanOfHeads`), and any other
network that ends with an ``nn.Linear`` (torchvision's), split at its input."""

from __future__ import annotations

from torch import nn

from ..models.classifier import classifier_head, features_and_logits, last_linear, pooled_features

__all__ = ["FEATURE_SPLIT", "check_feature_split", "pooled_features", "classifier_head", "features_and_logits"]

FEATURE_SPLIT = ("forward_features", "get_classifier")


def check_feature_split(model: nn.Module, method: str) -> None:
    """Refuse a model that cannot give ``method`` its features, naming what it lacks."""
    missing = [name for name in FEATURE_SPLIT if not callable(getattr(model, name, None))]
    if missing and not callable(getattr(model, "text_features", None)) and last_linear(model) is not None:
        return  # split at its last nn.Linear (torchvision's classifiers), checked at the first forward
    if not missing:
        try:
            head = classifier_head(model)
        except AttributeError:  # a wrapper whose network has no classifier to give
            head = None
        if not isinstance(head, nn.Module):
            missing = ["a get_classifier() that returns the last layer"]
    if missing:
        if callable(getattr(model, "text_features", None)):  # tta.models.clip.CLIPClassifier
            hint = ("A CLIP classifier's head is its class text features, not a layer: use tpt, rlcf, vte, "
                    "ttrv or an entropy method on it")
        else:
            hint = ("timm networks, the classifiers of tta.load_model and networks that end with an "
                    "nn.Linear (torchvision's) have them; give another network timm's interface")
        raise TypeError(
            f"{method} learns on the model's features and needs model.forward_features and "
            f"model.get_classifier() -> the last layer; {type(model).__name__} lacks {' and '.join(missing)}. "
            + hint
        )

