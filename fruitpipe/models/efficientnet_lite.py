"""EfficientNet-Lite0 in plain torch, with module names that load the bundled weights strictly.

Lite differs from B0: ReLU6 instead of swish, no squeeze-excite, stem and head widths not scaled. The weights
were trained in TensorFlow, so convolutions use TF "SAME" padding: asymmetric (more on the bottom/right) at
stride 2, and dependent on the input size, which is why the network is built for one input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fruitpipe.models import register_model
from fruitpipe.models.specs import EFFICIENTNET_LITE0

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = EFFICIENTNET_LITE0.feature_dim
NUM_CLASSES = 1000
DROPOUT = 0.2

# (repeats, kernel, first stride, expand ratio, in channels, out channels), as B0.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding, fixed for an input of side `in_size`.

    Symmetric padding is the convolution's own; only the asymmetric stride-2 case needs a separate pad. That pad
    names its zero fill explicitly: exported without it, the ONNX Pad has an empty constant_value input, which
    ONNX Runtime's Pad+Conv fusion does not take, and each of the five unfused Pads costs a copy plus a layout
    change around it (1.2-1.4x slower inference, measured by bench/graph_bench.py).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        out_size = math.ceil(in_size / stride)
        total = max((out_size - 1) * stride + kernel_size - in_size, 0)
        before, after = total // 2, total - total // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=False,
                         padding=before if before == after else 0)
        self.out_size = out_size
        self.asymmetric_pad = None if before == after else (before, after) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad is not None:
            x = F.pad(x, self.asymmetric_pad, value=0.0)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, 1x1 linear projection, identity skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
                 in_size: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, in_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, in_size, stride=stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, out_channels, 1, self._depthwise_conv.out_size)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.out_size = self._depthwise_conv.out_size
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.has_skip else x


class EfficientNetLite(nn.Module):
    """Stem, 16 MBConv blocks, 1x1 head to 1280 channels, global average pool, linear classifier."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, input_size, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        size = self._conv_stem.out_size
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in STAGES:
            for index in range(repeats):
                block = MBConvBlock(in_channels if index == 0 else out_channels, out_channels, kernel,
                                    stride if index == 0 else 1, expand, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(STAGES[-1][-1], HEAD_CHANNELS, 1, size)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._dropout = nn.Dropout(DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return features, self._fc(self._dropout(features))


@register_model(EFFICIENTNET_LITE0.name)
def efficientnet_lite0(input_size: int) -> nn.Module:
    """EfficientNet-Lite0 (4.65 M parameters) with TF padding for `input_size` inputs."""
    return EfficientNetLite(input_size)
