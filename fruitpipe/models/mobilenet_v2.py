"""MobileNetV2 as torchvision builds it (same module names), so torchvision's ImageNet weights load strictly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fruitpipe.models import register_model
from fruitpipe.models.specs import MOBILENET_V2

LAST_CHANNELS = MOBILENET_V2.feature_dim
NUM_CLASSES = 1000
DROPOUT = 0.2

# (expand ratio, out channels, repeats, first stride)
INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

def conv_bn_relu6(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (batch norm), 2 (ReLU6)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when the ratio is 1), depthwise 3x3, linear 1x1 projection, skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, hidden)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """features.0 stem, features.1-17 inverted residuals, features.18 1x1 to 1280, classifier.1 linear."""

    def __init__(self) -> None:
        super().__init__()
        in_channels = 32
        layers: list[nn.Module] = [conv_bn_relu6(3, in_channels, 3, stride=2)]
        for expand_ratio, out_channels, repeats, stride in INVERTED_RESIDUALS:
            for index in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels, stride if index == 0 else 1, expand_ratio))
                in_channels = out_channels
        layers.append(conv_bn_relu6(in_channels, LAST_CHANNELS))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(DROPOUT), nn.Linear(LAST_CHANNELS, NUM_CLASSES))
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        """torchvision's initialisation, so "random" weights give activations of a realistic scale."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return features, self.classifier(features)


@register_model(MOBILENET_V2.name)
def mobilenet_v2(input_size: int) -> nn.Module:
    """MobileNetV2 1.0 (3,504,872 parameters); its symmetric padding works at any input size."""
    return MobileNetV2()
