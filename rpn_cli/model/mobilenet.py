"""MobileNetV2's feature trunk and a feature pyramid, with torchvision's parameter names.

torchvision's own modules would do, but importing torchvision costs about a
second here (it pulls in ``torch._dynamo``), a third of a short ``rpn propose``
run's start-up. These modules build the same layers under the same state-dict
keys, so torchvision's ImageNet weights and our checkpoints load unchanged;
tests compare both with torchvision's modules on the same weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2, width 1.0.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn_relu6(inputs: int, outputs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU6: keys ``0.weight``, ``1.*`` as torchvision's Conv2dNormActivation."""
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); a residual when shapes allow."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = int(round(inputs * expansion))
        self.use_residual = stride == 1 and inputs == outputs
        layers = [conv_bn_relu6(inputs, hidden, kernel_size=1)] if expansion != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, outputs, 1, bias=False),
            nn.BatchNorm2d(outputs),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """MobileNetV2's ``features`` (19 blocks, stride 32, 1280 channels out), randomly initialised
    as torchvision does (He normal, fan out, for convs; unit BatchNorm)."""
    blocks: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, stride=2)]
    channels = STEM_CHANNELS
    for expansion, outputs, repeats, stride in INVERTED_RESIDUAL_SETTING:
        for index in range(repeats):
            blocks.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
            channels = outputs
    blocks.append(conv_bn_relu6(channels, LAST_CHANNELS, kernel_size=1))
    features = nn.Sequential(*blocks)
    initialise_trunk(features)
    return features


def initialise_trunk(trunk: nn.Module) -> None:
    """torchvision's random start for mobile trunks: He normal (fan out) convolutions, unit BatchNorm."""
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class FeaturePyramid(nn.Module):
    """A top-down feature pyramid (Lin et al. 2017) without extra levels, as torchvision's
    ``FeaturePyramidNetwork``: 1x1 lateral convs (``inner_blocks.i.0``), nearest upsampling,
    3x3 output convs (``layer_blocks.i.0``)."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.inner_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 1)) for c in in_channels)
        self.layer_blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))
                                          for _ in in_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: maps finest first; returns as many maps of ``channels`` channels, same sizes."""
        top_down = self.inner_blocks[-1](features[-1])
        outputs = [self.layer_blocks[-1](top_down)]
        for index in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[index](features[index])
            top_down = lateral + functional.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.layer_blocks[index](top_down))
        return outputs
