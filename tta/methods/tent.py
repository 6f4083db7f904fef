"""``tent``: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021).

Adapts the norm layers' affine parameters, with test-batch statistics, to minimise
the mean prediction entropy of each batch.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import TTAMethod
from .records import StepRecord
from .entropy import softmax_entropy
from .registry import register_method


@register_method("tent")
class Tent(TTAMethod):
    """Tent. Defaults are the paper's CIFAR setting and its reference code's:
    Adam, lr 1e-3 (the ImageNet setting is ``optimizer="sgd", lr=2.5e-4``).

    Presets: ``"cifar10"`` is these defaults (also the CIFAR-10-C setting of
    mariodoebler/test-time-adaptation, cfgs/cifar10_c/tent.yaml); ``"imagenet"`` is
    the paper's ImageNet setting, SGD with momentum 0.9 and lr 2.5e-4 at batch 64."""

    presets = {"cifar10": {}, "imagenet": {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9}}

    def __init__(
        self, model: nn.Module, *, optimizer: str = "adam", lr: float = 1e-3, **kwargs
    ) -> None:
        super().__init__(model, optimizer=optimizer, lr=lr, **kwargs)

    def forward_and_adapt(self, x: Tensor) -> tuple[Tensor, StepRecord]:
        logits = self.model(x)
        loss = softmax_entropy(logits).mean()
        self.backward(loss)
        self.step()
        record = StepRecord(num_samples=x.shape[0], num_selected=x.shape[0], loss=loss.detach())
        return logits.detach(), record
