"""The model description: what a checkpoint stores to rebuild a network and use it correctly.

Typed dataclasses, each field's default in one place; stored as JSON inside every checkpoint and
export (:meth:`ModelSpec.to_dict`), read back with :meth:`ModelSpec.from_dict`, which checks types
and ranges first (a file is untrusted) and leaves keys it does not know aside. Nothing about a
checkpoint is guessed at load time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import CheckpointError, UsageError
from .anchors import anchor_shapes, seed_project_anchor_shapes
from .boxes import DEFAULT_DELTA_CLAMP
from .proposals import MAX_LEVEL_OFFSET, ProposalLayer, ProposalSettings

FORMAT_VERSION = 1
SCORE_KINDS = ("sigmoid", "softmax2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Input sides a description may ask for: beyond these a file would make us allocate absurd tensors.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 8192
MAX_HEAD_DEPTH = 16  # 3x3 convolutions in the head


@dataclass
class BackboneSpec:
    """Which trunk (a name in :func:`rpn_cli.model.backbones.backbone_names`) and its options."""

    name: str
    fpn_channels: int | None = None  # *_fpn trunks: channels of the feature pyramid (None: 128)
    # *_fpn trunks: the factor on the stage outputs the pyramid takes in (None: the trunk's default,
    # default_feature_scale). Recorded in new files, so that a change of default cannot change
    # what a checkpoint computes.
    feature_scale: float | None = None
    arch: str | None = None  # torchvision-fpn: the torchvision detector whose trunk it is


@dataclass
class LevelSpec:
    """One feature map: its stride and its anchors (A, 4) x1y1x2y2 around a cell's origin, in the order
    of the head's channels; ``ratios``, ``scales``, ``sizes`` and ``anchor_order`` record how they were made."""

    stride: int
    anchors: list[list[float]]
    ratios: list[float] | None = None
    scales: list[float] | None = None
    sizes: list[float] | None = None
    anchor_order: str | None = None


@dataclass
class HeadSpec:
    mid_channels: int
    conv_depth: int = 1  # 3x3 convs before the 1x1 outputs


@dataclass
class PreprocessSpec:
    """From a decoded RGB image to the network's input (see :mod:`rpn_cli.model.preprocess`)."""

    size: int  # the shorter side after resizing
    resize: str = "shorter_side"  # or "torchvision" (GeneralizedRCNNTransform's rule)
    max_size: int | None = None  # the longer side's limit
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    scale: float = 1.0  # pixel values times this, then (x - mean) / std
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    size_divisible: int = 1  # a batch is zero-padded to a multiple of this


@dataclass
class ModelSpec:
    """Architecture, anchors, preprocessing, proposal limits and provenance of one RPN checkpoint.

    ``levels``: one per feature map, finest first. ``score``: ``sigmoid`` (one logit per anchor) or
    ``softmax2`` (the seed's interleaved background/foreground pairs). ``anchor_stride``: ``nominal``
    (each level's stride) or ``image_over_grid`` (padded image size // feature map size per axis, as
    torchvision computes it). ``provenance``: free-form, how the weights were made.
    """

    backbone: BackboneSpec
    levels: list[LevelSpec]
    head: HeadSpec
    preprocess: PreprocessSpec
    score: str = "sigmoid"
    anchor_offset: float = 0.0
    anchor_stride: str = "nominal"
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    delta_clamp: float = DEFAULT_DELTA_CLAMP
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (unset optional fields of the backbone and levels left out)."""
        data = asdict(self)
        data["backbone"] = _without_none(data["backbone"])
        data["levels"] = [_without_none(level) for level in data["levels"]]
        data["proposals"] = self.proposals.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "checkpoint") -> "ModelSpec":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: model description must be an object")
        missing = [key for key in ("backbone", "levels", "head", "preprocess") if key not in data]
        if missing:
            raise CheckpointError(f"{source}: model description lacks {', '.join(missing)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(f"{source}: written by a newer rpn (format {data['format_version']})")
        problem = _description_problem(data)
        if problem:
            raise CheckpointError(f"{source}: model description: {problem}")
        top = _known(cls, data)
        top["backbone"] = BackboneSpec(**_known(BackboneSpec, data["backbone"]))
        top["levels"] = [LevelSpec(**_known(LevelSpec, level)) for level in data["levels"]]
        top["head"] = HeadSpec(**_known(HeadSpec, data["head"]))
        top["preprocess"] = PreprocessSpec(**_known(PreprocessSpec, data["preprocess"]))
        if "proposals" in top:
            top["proposals"] = ProposalSettings(**_known(ProposalSettings, data["proposals"]))
        return cls(**top)

    @property
    def anchors_per_location(self) -> int:
        return len(self.levels[0].anchors)

    def proposal_settings(self, **overrides) -> ProposalSettings:
        """The stored limits with the given ones (None: keep the stored) in their place, checked."""
        return replace(self.proposals, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def proposal_layer(self, **overrides) -> ProposalLayer:
        """The proposal layer of this model, with :meth:`proposal_settings`'s limits; built once per run."""
        settings = self.proposal_settings(**overrides)
        if settings.level_offsets and len(settings.level_offsets) != len(self.levels):
            raise UsageError(f"level offsets {','.join(f'{value:g}' for value in settings.level_offsets)}: "
                             f"expected {len(self.levels)}, one a pyramid level of this model")
        return ProposalLayer(settings, self.score, tuple(self.box_weights), float(self.delta_clamp))


def _without_none(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def _known(kind: type, values: dict) -> dict:
    """The entries of ``values`` that are fields of the dataclass ``kind`` (a newer file may hold more)."""
    names = {f.name for f in fields(kind)}
    return {key: value for key, value in values.items() if key in names}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _description_problem(data: dict) -> str | None:
    """What is wrong with a description read from a file (types and ranges), or None."""
    for name in ("backbone", "head", "preprocess", "proposals", "provenance"):
        if not isinstance(data.get(name, {}), dict):
            return f"{name} must be an object"
    if not isinstance(data["backbone"].get("name"), str):
        return "backbone needs a name"
    scale = data["backbone"].get("feature_scale")
    if scale is not None and not (_is_number(scale) and scale > 0):
        return f"backbone.feature_scale must be a number above 0, got {scale!r}"
    levels = data["levels"]
    if not isinstance(levels, list) or not levels:
        return "levels must be a non-empty list"
    for number, level in enumerate(levels):
        if not isinstance(level, dict) or not isinstance(level.get("stride"), int) or level["stride"] < 1:
            return f"levels[{number}] needs a positive whole 'stride'"
        anchors = level.get("anchors")
        if not isinstance(anchors, list) or not anchors or not all(
                isinstance(box, list) and len(box) == 4 and all(map(_is_number, box)) for box in anchors):
            return f"levels[{number}] needs 'anchors', a list of [x1, y1, x2, y2] numbers"
    counts = {len(level["anchors"]) for level in levels}
    if len(counts) != 1:
        return f"every level needs the same number of anchors, got {sorted(counts)}"
    if data.get("score", "sigmoid") not in SCORE_KINDS:
        return f"unknown score kind {data.get('score')!r}"
    mid = data["head"].get("mid_channels")
    if not isinstance(mid, int) or not 1 <= mid <= 4096:
        return "head.mid_channels must be a whole number from 1 to 4096"
    depth = data["head"].get("conv_depth", 1)
    if not isinstance(depth, int) or not 1 <= depth <= MAX_HEAD_DEPTH:
        return f"head.conv_depth must be a whole number from 1 to {MAX_HEAD_DEPTH}"
    preprocess = data["preprocess"]
    for key in ("size", "max_size"):
        value = preprocess.get(key)
        if (key == "size" or value is not None) and not (
                _is_number(value) and MIN_INPUT_SIDE <= value <= MAX_INPUT_SIDE):
            return f"preprocess.{key} must be a number of pixels from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}, got {value!r}"
    for key in ("mean", "std"):
        value = preprocess.get(key, [0.0, 0.0, 0.0])
        if not (isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))):
            return f"preprocess.{key} must be 3 numbers"
    if not all(_is_number(preprocess.get(key, 1)) for key in ("scale", "size_divisible")):
        return "preprocess.scale and preprocess.size_divisible must be numbers"
    box_weights = data.get("box_weights", [1.0] * 4)
    if not (isinstance(box_weights, list) and len(box_weights) == 4 and all(map(_is_number, box_weights))):
        return "box_weights must be 4 numbers"
    if not _is_number(data.get("delta_clamp", 0.0)) or not _is_number(data.get("anchor_offset", 0.0)):
        return "delta_clamp and anchor_offset must be numbers"
    proposals = data.get("proposals", {})
    numbers = {f.name for f in fields(ProposalSettings) if f.type in ("int", "float")}
    if not all(_is_number(value) for key, value in proposals.items() if key in numbers):
        return "proposals limits must be numbers"
    offsets = proposals.get("level_offsets", [])
    if not (isinstance(offsets, list) and len(offsets) in (0, len(levels))
            and all(_is_number(value) and abs(value) <= MAX_LEVEL_OFFSET for value in offsets)):
        return (f"proposals.level_offsets must be none or {len(levels)} numbers from -{MAX_LEVEL_OFFSET:g} to "
                f"{MAX_LEVEL_OFFSET:g}, one a level")
    return None


# Lite0's stage outputs are about 10x MobileNetV2's (standard deviations 7.5 / 5.9 / 2.9 against 0.81 /
# 0.52 / 0.21 on COCO photos, ImageNet weights). The pyramid's lateral convs learn as fast as the square
# of their input's scale, so unscaled they ran away at the learning rate MobileNetV2 trains at (the
# stride-8 level's logits reached a standard deviation of 65 in one epoch, AR 0): scaled, both trunks
# hand the pyramid features of one size. New Lite0 models record it (BackboneSpec.feature_scale).
EFFICIENTNET_LITE0_FEATURE_SCALE = 0.1


def default_feature_scale(name: str) -> float:
    """The factor a pyramid trunk's stage outputs take when its description names none: Lite0 files
    written before the scale was recorded were trained with it (those from before the scale existed
    diverged and were never kept); MobileNetV2's is 1."""
    return EFFICIENTNET_LITE0_FEATURE_SCALE if name == "efficientnet_lite0_fpn" else 1.0


# The trunks under the shipped network's feature pyramid, head and anchors.
PYRAMID_TRUNKS = ("mobilenet_v2_fpn", "efficientnet_lite0_fpn")


def default_mobilenet_spec(
    fpn_channels: int = 128,
    mid_channels: int = 128,
    sizes_per_level: tuple = ((16, 32), (64, 128), (256, 512)),
    ratios: tuple = (0.5, 1.0, 2.0),
    shorter_side: int = 512,
    max_size: int = 853,
    backbone: str = "mobilenet_v2_fpn",
) -> ModelSpec:
    """The architecture of the shipped default: MobileNetV2 + FPN at strides 8/16/32. With
    ``backbone="efficientnet_lite0_fpn"``, the same pyramid, head and anchors on EfficientNet-Lite0,
    fed as its ImageNet weights were trained ((RGB - 127) / 128, sides padded to multiples of 32)."""
    if backbone not in PYRAMID_TRUNKS:
        raise UsageError(f"backbone {backbone!r}: this pyramid is built on {' or '.join(PYRAMID_TRUNKS)}")
    levels = []
    for stride, sizes in zip((8, 16, 32), sizes_per_level):
        scales = [size / stride for size in sizes]
        levels.append(LevelSpec(stride, anchor_shapes(stride, ratios, scales).tolist(), list(ratios), scales))
    feature_scale = None
    if backbone == "efficientnet_lite0_fpn":
        from .efficientnet import LITE_MEAN, LITE_STD

        preprocess = PreprocessSpec(size=shorter_side, max_size=max_size, scale=1.0, mean=list(LITE_MEAN),
                                    std=list(LITE_STD), size_divisible=32)
        feature_scale = EFFICIENTNET_LITE0_FEATURE_SCALE
    else:
        preprocess = imagenet_preprocess(shorter_side, max_size)
    return ModelSpec(
        backbone=BackboneSpec(backbone, fpn_channels=fpn_channels, feature_scale=feature_scale),
        levels=levels,
        head=HeadSpec(mid_channels),
        score="sigmoid",
        preprocess=preprocess,
    )


def imagenet_preprocess(shorter_side: int, max_size: int | None, interpolation: str = "bilinear") -> PreprocessSpec:
    return PreprocessSpec(size=shorter_side, max_size=max_size, interpolation=interpolation, scale=1.0 / 255.0,
                          mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def seed_project_spec() -> ModelSpec:
    """The seed project's ResNet-50 C4 RPN with its conventions (notes: 'original project')."""
    ratios, scales = [0.5, 1.0, 2.0], [8.0, 16.0, 32.0]
    return ModelSpec(
        backbone=BackboneSpec("resnet50-c4"),
        levels=[LevelSpec(16, seed_project_anchor_shapes(16, ratios, scales).tolist(), ratios, scales,
                          anchor_order="seed-project (x/y transposed)")],
        head=HeadSpec(512),
        score="softmax2",
        preprocess=PreprocessSpec(size=600, interpolation="bicubic", scale=1.0 / 255.0),
    )
