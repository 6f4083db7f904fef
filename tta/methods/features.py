"""The feature/classifier split that methods learning on features use (RMT and
SANTA's prototypes and contrastive loss, AdaContrast's memory bank and MoCo keys,
LAME's affinities): :func:`pooled_features` gives the pooled (B, D) features the
classifier reads and :func:`classifier_head` the last layer, for the models of
``tta.load_model`` (``forward_features`` pooled) and for timm networks as timm
builds them (``forward_features`` unpooled, then ``forward_head``), two-headed
distilled ones included (:class:`~tta.models.classifier.MeanOfHeads`)."""

from __future__ import annotations

from torch import Tensor, nn

from ..models.classifier import classifier_head, pooled_features

__all__ = ["FEATURE_SPLIT", "check_feature_split", "pooled_features", "classifier_head"]

FEATURE_SPLIT = ("forward_features", "get_classifier")


def check_feature_split(model: nn.Module, method: str) -> None:
    """Refuse a model that cannot give ``method`` its features, naming what it lacks."""
    missing = [name for name in FEATURE_SPLIT if not callable(getattr(model, name, None))]
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
            hint = ("timm networks and the classifiers of tta.load_model have both; give another network "
                    "timm's interface (forward_features, then forward_head(features, pre_logits=True)) or a "
                    "forward_features(x) -> pooled (B, D) features")
        raise TypeError(
            f"{method} learns on the model's features and needs model.forward_features and "
            f"model.get_classifier() -> the last layer; {type(model).__name__} lacks {' and '.join(missing)}. "
            + hint
        )

