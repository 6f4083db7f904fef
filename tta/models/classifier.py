"""Classifiers in pixel space: normalisation lives inside the model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_pixels(x: Tensor, like: Tensor) -> Tensor:
    """Images ``x`` as a pixel-space model takes them: float, in the dtype of its
    normalisation constants ``like`` (which follow the model's ``.to(dtype)``).
    Integer images are refused: cast to their dtype, the mean and std became 0
    and every logit NaN."""
    if not x.is_floating_point():
        raise TypeError(f"expected float RGB images in [0, 1], got dtype {x.dtype}; "
                        "convert uint8 images with x.float() / 255")
    return x.to(like.dtype)


class ImageClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for float RGB ``x`` in [0, 1].

    Keeping normalisation inside the model lets augmentations and corruptions work
    on plain pixels. ``num_classes`` and ``input_size`` describe what it expects.
    The backbone follows timm's interface (``forward_features``, ``forward_head``,
    ``get_classifier``), which :meth:`forward_features` and :meth:`get_classifier`
    expose in pixel space.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        x = as_pixels(x, self.mean)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.normalize(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled features the classifier reads (timm's ``pre_logits``), (B, D):
        ``get_classifier()(forward_features(x))`` is ``forward(x)``. Methods that
        learn on features (RMT, SANTA, AdaContrast, LAME) use this split."""
        return pooled_features(self.backbone, self.normalize(x))

    def get_classifier(self) -> nn.Module:
        """The last layer, features to logits (:class:`MeanOfHeads` for networks
        with a distillation head)."""
        return classifier_head(self.backbone)


class MeanOfHeads(nn.Module):
    """The classifier of a timm network trained with a distillation head (DeiT,
    PiT, LeViT, EfficientFormer(V2), SwiftFormer): outside timm's distilled
    training the network predicts the mean of its two heads' logits.

    With ``split`` each head reads its own half of the features (DeiT's and PiT's
    class and distillation tokens, side by side in :func:`pooled_features`);
    without, both read the same features."""

    def __init__(self, head: nn.Module, head_dist: nn.Module, split: bool) -> None:
        super().__init__()
        self.head, self.head_dist, self.split = head, head_dist, split

    def forward(self, features: Tensor) -> Tensor:
        own, dist = features.chunk(2, dim=1) if self.split else (features, features)
        return (self.head(own) + self.head_dist(dist)) / 2


def reads_two_tokens(net: nn.Module) -> bool:
    """Whether ``net``'s two heads read two different tokens (DeiT's and PiT's
    distilled networks), whose pre-logits are the tokens' mean, not what either
    head reads."""
    try:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.pit import PoolingVisionTransformer
    except ImportError:  # timm absent or reorganised: no such network can be built
        return False
    if isinstance(net, VisionTransformerDistilled):
        return True
    return isinstance(net, PoolingVisionTransformer) and getattr(net, "head_dist", None) is not None


def has_feature_split(net: nn.Module) -> bool:
    """Whether ``net`` has timm's split: ``forward_features`` and ``get_classifier``."""
    return callable(getattr(net, "forward_features", None)) and callable(getattr(net, "get_classifier", None))


def last_linear(net: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` of ``net``: the classifier of a network without timm's
    split that ends with one (torchvision's ``fc``, ``classifier[-1]``, ``heads.head``)."""
    found = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            found = module
    return found


def pooled_features(net: nn.Module, x: Tensor) -> Tensor:
    """The (B, D) features ``classifier_head(net)`` turns into ``net(x)``'s logits:
    for a network with timm's interface, ``forward_features`` (unpooled) then
    ``forward_head``, or ``forward_features`` alone where it is already pooled (no
    ``forward_head``, as :class:`ImageClassifier`); for any other network, the input
    of its last ``nn.Linear``, which must give the network's output."""
    if not has_feature_split(net):
        return _last_linear_io(net, x)[0]
    if not callable(getattr(net, "forward_head", None)):
        return net.forward_features(x)
    tokens = net.forward_features(x)
    if reads_two_tokens(net):
        drop = getattr(net, "head_drop", None) or nn.Identity()
        return torch.cat((drop(tokens[:, 0]), drop(tokens[:, 1])), dim=1)
    return net.forward_head(tokens, pre_logits=True)


def classifier_head(net: nn.Module) -> nn.Module | None:
    """``net.get_classifier()`` (the two heads of a distilled network as one
    :class:`MeanOfHeads`), else the network's last ``nn.Linear`` (None if it has
    none)."""
    if not has_feature_split(net):
        return last_linear(net)
    head = net.get_classifier()
    if isinstance(head, (tuple, list)) and len(head) == 2 and all(isinstance(h, nn.Module) for h in head):
        return MeanOfHeads(head[0], head[1], split=reads_two_tokens(net))
    return head


def features_and_logits(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`pooled_features` of ``x`` and the logits :func:`classifier_head` makes
    of them (``net(x)``'s), from one forward."""
    if not has_feature_split(net):
        return _last_linear_io(net, x)
    features = pooled_features(net, x)
    return features, classifier_head(net)(features)


def _last_linear_io(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The input and output of ``net``'s last ``nn.Linear`` in ``net(x)``: its
    features and its logits."""
    # A hook for this forward only: the network is the user's, and copies of it
    # (teachers, key encoders) would carry a lasting one along.
    head = last_linear(net)
    if head is None:
        raise TypeError(f"{type(net).__name__} has no nn.Linear classifier to split its features from")
    seen: dict[str, Tensor] = {}

    def record(module: nn.Module, args: tuple, output: Tensor) -> None:
        seen["features"], seen["logits"] = args[0], output

    handle = head.register_forward_hook(record)
    try:
        logits = net(x)
    finally:
        handle.remove()
    features = seen.get("features")
    if features is None or logits is not seen["logits"] or features.dim() != 2:
        raise TypeError(
            f"{type(net).__name__}'s output is not its last nn.Linear applied to (B, D) features, so its "
            "features cannot be split from it: give the network forward_features(x) -> pooled (B, D) features "
            "and get_classifier() -> the layer that turns them into its output (timm's interface)"
        )
    return features, logits
