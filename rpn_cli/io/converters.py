"""Importing other projects' weights: the seed project's and torchvision's detectors, ImageNet trunks (torchvision's, efficientnet_pytorch's Lite0)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from ..model.backbones import (
    _MOBILENET_V2_STAGE_ENDS,
    _MOBILENET_V2_STAGE_STARTS,
    EFFICIENTNET_LITE0_STAGE_ENDS,
    EFFICIENTNET_LITE0_STAGE_STARTS,
    TORCHVISION_ARCHS,
    SingleLevelBackbone,
    torchvision_detector,
)
from ..model.efficientnet import (
    efficientnet_lite0_features,
    efficientnet_pytorch_key_map,
)
from ..model.mobilenet import mobilenet_v2_features
from ..model.network import RegionProposalNetwork
from ..model.proposals import ProposalSettings
from ..model.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    HeadSpec,
    LevelSpec,
    ModelSpec,
    PreprocessSpec,
    seed_project_spec,
)
from .checkpoint import load_state_strict, read_torch_state_dict, save_checkpoint
from .files import check_destination


def convert_seed_project(source: str | Path, destination: str | Path) -> ModelSpec:
    """Import a seed-project state dict (``extractor.*``, ``rpn.conv1|score|loc.*``) into our format."""
    source = Path(source)
    check_destination(Path(destination), (".safetensors",), "a checkpoint of ours", [source])
    spec = seed_project_spec()
    spec.provenance = {"converted_from": str(source), "source_format": "seed-project",
                       "note": "anchors in the seed project's transposed x/y order; RGB/255 input, no mean"}
    model = _import_state(spec, read_torch_state_dict(source), source,
                          ("extractor.", "rpn.conv1.", "rpn.score.", "rpn.loc."), _seed_project_key)
    save_checkpoint(model, destination, spec)
    return spec


def _import_state(spec: ModelSpec, state: dict, source: Path, imported_prefixes: tuple[str, ...],
                  name_in_source: Callable[[str], str]) -> RegionProposalNetwork:
    """Our model for ``spec`` holding ``state``, another project's state dict whose names for our
    parameters ``name_in_source`` gives. Its keys under ``imported_prefixes`` are what is imported
    (one no parameter of ours takes is an error); the rest (e.g. a detector's ROI heads) is ignored."""
    model = RegionProposalNetwork(spec)
    ours = {name_in_source(key): key for key in model.state_dict()}
    tensors = {ours.get(key, key): tensor for key, tensor in state.items() if key.startswith(imported_prefixes)}
    _fill_batches_tracked(model, tensors)
    load_state_strict(model, tensors, str(source), name_in_source)
    return model


def _fill_batches_tracked(model: RegionProposalNetwork, tensors: dict) -> None:
    """BatchNorm's ``num_batches_tracked``, unused at inference, is absent from some files (frozen
    BatchNorm, as in torchvision's pretrained detectors, has none): take the model's own."""
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in tensors:
            tensors[key] = value


def _current_torchvision_layout(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        old = _OLD_TORCHVISION_KEY.match(key)
        if old and old.group(1) == "rpn.head.conv":
            key = f"rpn.head.conv.0.0.{old.group(2)}"
        elif old:
            key = f"{old.group(1)}.0.{old.group(2)}"
        renamed[key] = value
    return renamed


def _seed_project_key(key: str) -> str:
    """Our parameter name as the seed project's state dict spells it."""
    if key.startswith("backbone.body."):
        return "extractor." + key[len("backbone.body."):]
    if key.startswith("head."):
        return "rpn." + key[len("head."):]
    return key


def torchvision_spec(arch: str) -> ModelSpec:
    """Our description of a torchvision Faster R-CNN's RPN, read off the model torchvision builds."""
    detector = torchvision_detector(arch)
    rpn, transform = detector.rpn, detector.transform
    generator = rpn.anchor_generator
    strides = TORCHVISION_ARCHS[arch]
    levels = [
        LevelSpec(stride, cells.tolist(), ratios=list(ratios), sizes=list(sizes))
        for stride, sizes, ratios, cells in zip(strides, generator.sizes, generator.aspect_ratios, generator.cell_anchors)
    ]
    return ModelSpec(
        backbone=BackboneSpec("torchvision-fpn", arch=arch),
        levels=levels,
        head=HeadSpec(detector.backbone.out_channels, conv_depth=len(rpn.head.conv)),
        score="sigmoid",
        anchor_stride="image_over_grid",
        box_weights=list(rpn.box_coder.weights),
        delta_clamp=float(rpn.box_coder.bbox_xform_clip),
        preprocess=PreprocessSpec(
            size=int(transform.min_size[-1]), resize="torchvision", max_size=int(transform.max_size),
            size_divisible=int(transform.size_divisible), scale=1.0 / 255.0, mean=list(transform.image_mean),
            std=list(transform.image_std),
        ),
        proposals=ProposalSettings(
            pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]), post_nms_top_n=int(rpn._post_nms_top_n["testing"]),
            nms_iou=float(rpn.nms_thresh), min_size=float(rpn.min_size), min_score=float(rpn.score_thresh),
            nms_per_level=True, top_n_before_filtering=True,
        ),
    )


def _torchvision_key(key: str) -> str:
    """Our parameter name as a torchvision detector's state dict spells it (the backbone's are the same;
    torchvision's head convs are ``Conv2dNormActivation``, hence the ``.0``)."""
    if key.startswith("head.conv1."):
        return "rpn.head.conv.0.0." + key[len("head.conv1."):]
    if key.startswith("head.more_convs."):
        index, rest = key[len("head.more_convs."):].split(".", 1)
        return f"rpn.head.conv.{int(index) + 1}.0.{rest}"
    if key.startswith("head.score."):
        return "rpn.head.cls_logits." + key[len("head.score."):]
    if key.startswith("head.loc."):
        return "rpn.head.bbox_pred." + key[len("head.loc."):]
    return key


def convert_torchvision(source: str | Path, destination: str | Path, arch: str) -> ModelSpec:
    """Import a torchvision Faster R-CNN state dict (backbone, FPN and RPN; the ROI heads are ignored)."""
    source = Path(source)
    check_destination(Path(destination), (".safetensors",), "a checkpoint of ours", [source])
    spec = torchvision_spec(arch)
    spec.provenance = {"converted_from": str(source), "source_format": "torchvision", "arch": arch}
    state = _current_torchvision_layout(read_torch_state_dict(source))
    model = _import_state(spec, state, source, ("backbone.body.", "backbone.fpn.", "rpn.head.conv.",
                                                "rpn.head.cls_logits.", "rpn.head.bbox_pred."), _torchvision_key)
    save_checkpoint(model, destination, spec)
    return spec


def load_imagenet_weights(backbone: nn.Module, description: BackboneSpec, path: Path) -> None:
    """Fill a trunk from the ImageNet state dict at ``path``: torchvision's MobileNetV2 for the
    ``mobilenet_v2`` backbones and ResNet-50 for ``resnet50-c4`` (its stem and layer1-3);
    ``efficientnet_pytorch``'s EfficientNet-Lite0 for ``efficientnet_lite0_fpn``."""
    from .checkpoint import (  # it imports this module
        load_state_strict,
        read_torch_state_dict,
    )

    name = description.name
    if not (name.startswith("mobilenet_v2") or name in ("resnet50-c4", "efficientnet_lite0_fpn")):
        raise UsageError(f"ImageNet weights by path are supported for the mobilenet_v2, efficientnet_lite0_fpn "
                         f"and resnet50-c4 backbones, not {name}")
    state = read_torch_state_dict(Path(path))
    if name == "efficientnet_lite0_fpn":
        reference = efficientnet_lite0_features()
        keys = efficientnet_pytorch_key_map(reference)
        ours = {keys[key]: value for key, value in state.items() if key in keys}
        source = f"{path} (EfficientNet-Lite0 ImageNet weights, efficientnet_pytorch keys)"
        original = {value: key for key, value in keys.items()}
        load_state_strict(reference, ours, source, lambda key: original.get(key, key))
        for stage, a, b in zip(backbone.stages, EFFICIENTNET_LITE0_STAGE_STARTS, EFFICIENTNET_LITE0_STAGE_ENDS):
            stage.load_state_dict(reference[a:b].state_dict())
        return
    source = f"{path} (torchvision {'ResNet-50' if name == 'resnet50-c4' else 'MobileNetV2'} ImageNet weights)"
    if name == "resnet50-c4":
        # Our trunk is Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3).
        positions = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
        names = {number: word for word, number in positions.items()}
        trunk = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head in positions:
                trunk[f"{positions[head]}.{rest}"] = value
        load_state_strict(backbone.body, trunk, source,
                          lambda key: f"{names[key.partition('.')[0]]}.{key.partition('.')[2]}")
        _take_imagenet_normalisation(backbone.body[0], backbone.body[1])
        return
    reference = mobilenet_v2_features()
    load_state_strict(reference, {key[len("features."):]: value for key, value in state.items()
                                  if key.startswith("features.")}, source, lambda key: f"features.{key}")
    if isinstance(backbone, SingleLevelBackbone):
        backbone.body.load_state_dict(reference[: len(backbone.body)].state_dict())
    else:
        for stage, a, b in zip(backbone.stages, _MOBILENET_V2_STAGE_STARTS, _MOBILENET_V2_STAGE_ENDS):
            stage.load_state_dict(reference[a:b].state_dict())


@torch.no_grad()
def _take_imagenet_normalisation(conv: nn.Conv2d, batchnorm: nn.BatchNorm2d) -> None:
    """Let an ImageNet stem (trained on ``(x - mean) / std``) take the seed project's plain RGB/255:
    each input channel's weights divided by its std, and the mean's response (now a constant per
    output channel) moved into the BatchNorm's running mean. Exact away from the zero padding."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    conv.weight.div_(std)
    batchnorm.running_mean.add_((conv.weight * mean).sum(dim=(1, 2, 3)))


# torchvision before 0.13 saved the RPN head's conv and the FPN's convs without the ``.0`` of
# Conv2dNormActivation (its hosted COCO weights still do); torchvision renames them on load, as here.
_OLD_TORCHVISION_KEY = re.compile(r"^(rpn\.head\.conv|backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")
