"""Backbones by name: a registry of builders, each giving feature maps at known strides.

A backbone is an ``nn.Module`` whose ``forward(images)`` returns a list of
feature maps, finest first, with ``strides`` and ``out_channels`` lists, and
``channels_last``: whether inference runs it in channels-last memory format
(measured faster on CPU for MobileNetV2 and ResNet-50 C4; torchvision's detectors
keep their layout, which also keeps their outputs bit-identical to torchvision's). Builders
take the backbone's description (:class:`~rpn_cli.model.spec.BackboneSpec`) and build
it with random weights; :func:`load_imagenet_weights` fills a trunk from
an ImageNet state dict on disk (torchvision's, or efficientnet_pytorch's for Lite0).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from .efficientnet import efficientnet_lite0_features
from .mobilenet import FeaturePyramid, mobilenet_v2_features
from .spec import BackboneSpec, default_feature_scale

BackboneBuilder = Callable[[dict], nn.Module]
# What torchvision's ImageNet trunks were trained on: (RGB / 255 - mean) / std.
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def add(builder: BackboneBuilder) -> BackboneBuilder:
        _REGISTRY[name] = builder
        return builder

    return add


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(description: BackboneSpec) -> nn.Module:
    """Build the backbone that ``description.name`` names, with random weights."""
    name = description.name
    if name not in _REGISTRY:
        raise UsageError(f"unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    return _REGISTRY[name](description)


class SingleLevelBackbone(nn.Module):
    """A trunk whose last output is the only feature map."""

    def __init__(self, body: nn.Sequential, stride: int, channels: int, channels_last: bool = False):
        super().__init__()
        self.body = body
        self.strides = [stride]
        self.out_channels = [channels]
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(images)]


class PyramidBackbone(nn.Module):
    """Trunk stages whose outputs, times ``feature_scale``, feed a feature pyramid (same width at every level)."""

    def __init__(self, stages: nn.ModuleList, stage_channels: list[int], strides: list[int], channels: int, *,
                 feature_scale: float = 1.0):
        super().__init__()
        self.stages = stages
        self.feature_scale = feature_scale
        self.fpn = FeaturePyramid(stage_channels, channels)
        self.strides = strides
        self.out_channels = [channels] * len(strides)
        self.channels_last = True

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x if self.feature_scale == 1.0 else x * self.feature_scale)
        return self.fpn(features)


def _seed_project_resnet50_c4() -> nn.Sequential:
    """ResNet-50 to layer3 as the seed project builds it: stride on a bottleneck's
    first 1x1 conv, stem max-pool with padding 0 and ceil mode."""
    from torchvision import models

    resnet = models.resnet50(weights=None)
    for layer in (resnet.layer2, resnet.layer3):
        first = layer[0]
        first.conv1.stride = (2, 2)
        first.conv2.stride = (1, 1)
    resnet.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
    return nn.Sequential(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3
    )


@register_backbone("resnet50-c4")
def _build_resnet50_c4(description: BackboneSpec) -> nn.Module:
    # Channels-last: 510 -> 435 ms float32, 279 -> 207 ms bfloat16 at 600 x 800 here (BatchNorm folded).
    return SingleLevelBackbone(_seed_project_resnet50_c4(), stride=16, channels=1024, channels_last=True)


@register_backbone("vgg16")
def _build_vgg16(description: BackboneSpec) -> nn.Module:
    from torchvision import models

    # features[:30] ends with conv5_3 and its ReLU, before the last max-pool.
    return SingleLevelBackbone(models.vgg16(weights=None).features[:30], stride=16, channels=512)


# torchvision's MobileNetV2 ``features`` indices where the stride-8, -16 and -32 maps end.
_MOBILENET_V2_STAGE_ENDS = (7, 14, 18)
_MOBILENET_V2_STAGE_STARTS = (0,) + _MOBILENET_V2_STAGE_ENDS[:-1]
_MOBILENET_V2_STAGE_CHANNELS = (32, 96, 320)


@register_backbone("mobilenet_v2")
def _build_mobilenet_v2(description: BackboneSpec) -> nn.Module:
    features = mobilenet_v2_features()
    return SingleLevelBackbone(features[: _MOBILENET_V2_STAGE_ENDS[1]], stride=16, channels=96, channels_last=True)


@register_backbone("mobilenet_v2_fpn")
def _build_mobilenet_v2_fpn(description: BackboneSpec) -> nn.Module:
    features = mobilenet_v2_features()
    stages = nn.ModuleList(features[a:b] for a, b in zip(_MOBILENET_V2_STAGE_STARTS, _MOBILENET_V2_STAGE_ENDS))
    return PyramidBackbone(
        stages, list(_MOBILENET_V2_STAGE_CHANNELS), [8, 16, 32], description.fpn_channels or 128,
        feature_scale=_feature_scale(description),
    )


# EfficientNet-Lite0 ``features`` indices (stem 0, blocks 1-16) where the stride-8, -16 and -32 maps end.
EFFICIENTNET_LITE0_STAGE_ENDS = (6, 12, 17)
EFFICIENTNET_LITE0_STAGE_STARTS = (0,) + EFFICIENTNET_LITE0_STAGE_ENDS[:-1]
_EFFICIENTNET_LITE0_STAGE_CHANNELS = (40, 112, 320)


def _feature_scale(description: BackboneSpec) -> float:
    if description.feature_scale is None:
        return default_feature_scale(description.name)
    return float(description.feature_scale)


@register_backbone("efficientnet_lite0_fpn")
def _build_efficientnet_lite0_fpn(description: BackboneSpec) -> nn.Module:
    features = efficientnet_lite0_features()
    stages = nn.ModuleList(features[a:b] for a, b in zip(EFFICIENTNET_LITE0_STAGE_STARTS,
                                                         EFFICIENTNET_LITE0_STAGE_ENDS))
    return PyramidBackbone(
        stages, list(_EFFICIENTNET_LITE0_STAGE_CHANNELS), [8, 16, 32], description.fpn_channels or 128,
        feature_scale=_feature_scale(description),
    )


TORCHVISION_ARCHS = {
    # name: (nominal strides of the FPN outputs, finest first)
    "fasterrcnn_resnet50_fpn": [4, 8, 16, 32, 64],
    "fasterrcnn_resnet50_fpn_v2": [4, 8, 16, 32, 64],
    "fasterrcnn_mobilenet_v3_large_fpn": [32, 32, 64],
    "fasterrcnn_mobilenet_v3_large_320_fpn": [32, 32, 64],
}


def torchvision_detector(arch: str) -> nn.Module:
    """torchvision's own Faster R-CNN builder, random weights and nothing downloaded."""
    if arch not in TORCHVISION_ARCHS:
        raise UsageError(f"unknown torchvision architecture {arch!r}; known: {', '.join(TORCHVISION_ARCHS)}")
    from torchvision.models import detection

    return getattr(detection, arch)(weights=None, weights_backbone=None)


class TorchvisionFPNBackbone(nn.Module):
    """torchvision's ``BackboneWithFPN`` (its ``body`` and ``fpn`` keep torchvision's key names)."""

    def __init__(self, arch: str):
        super().__init__()
        detector_backbone = torchvision_detector(arch).backbone
        self.body = detector_backbone.body
        self.fpn = detector_backbone.fpn
        self.strides = list(TORCHVISION_ARCHS[arch])
        self.out_channels = [detector_backbone.out_channels] * len(self.strides)
        self.channels_last = False
        # BatchNorm left unfolded in float32: outputs stay bit-identical to torchvision's model.rpn.
        self.fold_in_float32 = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.fpn(self.body(images)).values())


@register_backbone("torchvision-fpn")
def _build_torchvision_fpn(description: BackboneSpec) -> nn.Module:
    return TorchvisionFPNBackbone(description.arch)


