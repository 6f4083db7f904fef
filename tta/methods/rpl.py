"""``rpl``: robust pseudo-labelling (Rusak et al., TMLR 2022, "If your data
distribution shifts, use self-learning").

The norm layers' affine parameters adapt, with test-batch statistics, on the
model's own hard pseudo-labels (the argmax of the same forward) through the
generalised cross-entropy ``(1 - p_y^q) / q``: the gradient of cross-entropy scaled
by ``p_y^q``, so the confident predictions teach and the unsure ones barely pull,
which keeps the wrong labels of a shifted stream from taking over.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import TTAMethod
from .records import StepRecord
from .registry import register_method


def generalized_cross_entropy(logits: Tensor, q: float) -> Tensor:
    """Per row ``(1 - p_y^q) / q`` with ``y`` the argmax of ``logits`` (Zhang &
    Sabuncu 2018): cross-entropy as ``q -> 0``, the mean absolute error at 1."""
    probs = logits.float().softmax(1)
    confidence = probs.gather(1, probs.argmax(1, keepdim=True)).squeeze(1)
    return (1 - confidence.pow(q)) / q


@register_method("rpl")
class RPL(TTAMethod):
    """RPL. Defaults are the official CIFAR-10-C setting (mariodoebler/test-time-
    adaptation, cfgs/cifar10_c/rpl.yaml, with the paper's ``q = 0.8``): Adam, lr 1e-3,
    batch 200.

    Args:
        q: the generalised cross-entropy's exponent (0.8 in the paper and both codes).

    Presets: ``"cifar10"`` is these defaults; ``"imagenet"`` the ImageNet-C setting
    (cfgs/imagenet_c/rpl.yaml): SGD (momentum 0.9, Nesterov) lr 5e-4, batch 64.
    """

    presets = {"cifar10": {}, "imagenet": {"optimizer": "sgd", "lr": 5e-4, "momentum": 0.9, "nesterov": True}}

    def __init__(self, model: nn.Module, *, q: float = 0.8, optimizer: str = "adam", lr: float = 1e-3,
                 **kwargs) -> None:
        if not 0 < q <= 1:
            raise ValueError(f"q must be in (0, 1], got {q!r}")
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)
        self.q = q

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        loss = generalized_cross_entropy(logits, self.q).mean()
        self.backward(loss)
        self.step()
        return logits.detach(), StepRecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss.detach())
