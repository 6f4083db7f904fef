"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2) with the key layout of the
widely used pretrained checkpoints of akamaster/pytorch_resnet_cifar10: a 3x3 stem
of 16 channels, three stages of 16/32/64 channels, option-A shortcuts (identity, or
stride-2 subsampling with zero channel padding) and a final ``linear``.

``norm="gn"`` swaps every BatchNorm for GroupNorm (Wu & He 2018), the batch-independent
variant that TTA's wild settings (batch size 1, label shift) need; the key layout
stays the same (``bn1``, ``bn2``), so BN weights load into a GN net of equal depth."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CifarResNet"]

Norm = Literal["bn", "gn"]


def _norm(kind: Norm, channels: int, groups: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"norm must be 'bn' or 'gn', got {kind!r}")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: Norm = "bn", groups: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, planes, groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, planes, groups)
        self.shortcut = (
            PadShortcut(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs.

    Args:
        depth: 6n+2 (20, 26, 32, 44, 56, ...).
        num_classes: outputs of the final ``linear`` (0: none, the pooled 64-d
            features are returned).
        norm: ``"bn"`` (BatchNorm) or ``"gn"`` (GroupNorm with ``groups`` groups).
    """

    num_features = 64

    def __init__(self, depth: int = 20, num_classes: int = 10, norm: Norm = "bn", groups: int = 8) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (n >= 1), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.norm = depth, norm
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, 16, groups)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, norm, groups))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled 64-d features (before ``linear``)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's interface: the pooled features, through ``linear`` unless ``pre_logits``."""
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """timm's interface: a fresh ``linear`` with ``num_classes`` outputs (0: none)."""
        if global_pool not in ("avg", ""):
            raise ValueError(f"CifarResNet only pools by average, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
