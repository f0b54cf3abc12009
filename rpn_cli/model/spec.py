"""The model description: what a checkpoint stores to rebuild a network and use it correctly."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from .anchors import anchor_shapes, seed_project_anchor_shapes
from .backbones import IMAGENET_MEAN, IMAGENET_STD
from .boxes import DEFAULT_DELTA_CLAMP
from .proposals import ProposalSettings

FORMAT_VERSION = 1



SCORE_KINDS = ("sigmoid", "softmax2")



@dataclass
class ModelSpec:
    """Architecture, anchors, preprocessing and provenance of one RPN checkpoint.

    ``levels``: one entry per feature map, finest first, each
    ``{"stride": int, "anchors": [[x1, y1, x2, y2], ...]}`` in the order of the
    head's channels. ``score``: ``sigmoid`` (one logit per anchor) or
    ``softmax2`` (the seed's interleaved background/foreground pairs).
    ``anchor_stride``: ``nominal`` (each level's stride) or ``image_over_grid``
    (padded image size // feature map size per axis, as torchvision computes it).
    ``head``: ``mid_channels`` and optionally ``conv_depth`` (3x3 convs, default 1).
    """

    backbone: dict
    levels: list[dict]
    head: dict
    preprocess: dict
    score: str = "sigmoid"
    anchor_offset: float = 0.0
    anchor_stride: str = "nominal"
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    delta_clamp: float = DEFAULT_DELTA_CLAMP
    proposals: dict = field(default_factory=lambda: ProposalSettings().to_dict())
    provenance: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict, source: str = "checkpoint") -> "ModelSpec":
        required = ("backbone", "levels", "head", "preprocess")
        missing = [key for key in required if key not in data]
        if missing:
            raise CheckpointError(f"{source}: model description lacks {', '.join(missing)}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(f"{source}: written by a newer rpn (format {data['format_version']})")
        known = set(cls.__dataclass_fields__)
        spec = cls(**{key: value for key, value in data.items() if key in known})
        problem = _description_problem(spec)
        if problem:
            raise CheckpointError(f"{source}: model description: {problem}")
        return spec

    @property
    def anchors_per_location(self) -> int:
        return len(self.levels[0]["anchors"])

    def proposal_settings(self, **overrides) -> ProposalSettings:
        values = {**self.proposals, **{k: v for k, v in overrides.items() if v is not None}}
        return ProposalSettings(**values).validated()



# Input sides a description may ask for: beyond these a file would make us allocate absurd tensors.
MIN_INPUT_SIDE, MAX_INPUT_SIDE = 16, 8192



def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)



def _description_problem(spec: ModelSpec) -> str | None:
    """What is wrong with a description read from a file (types and ranges), or None."""
    for name in ("backbone", "head", "preprocess", "proposals", "provenance"):
        if not isinstance(getattr(spec, name), dict):
            return f"{name} must be an object"
    if not isinstance(spec.backbone.get("name"), str):
        return "backbone needs a name"
    if not isinstance(spec.levels, list) or not spec.levels:
        return "levels must be a non-empty list"
    for number, level in enumerate(spec.levels):
        if not isinstance(level, dict) or not isinstance(level.get("stride"), int) or level["stride"] < 1:
            return f"levels[{number}] needs a positive whole 'stride'"
        anchors = level.get("anchors")
        if not isinstance(anchors, list) or not anchors or not all(
                isinstance(box, list) and len(box) == 4 and all(map(_is_number, box)) for box in anchors):
            return f"levels[{number}] needs 'anchors', a list of [x1, y1, x2, y2] numbers"
    counts = {len(level["anchors"]) for level in spec.levels}
    if len(counts) != 1:
        return f"every level needs the same number of anchors, got {sorted(counts)}"
    if spec.score not in SCORE_KINDS:
        return f"unknown score kind {spec.score!r}"
    mid = spec.head.get("mid_channels")
    if not isinstance(mid, int) or not 1 <= mid <= 4096:
        return "head.mid_channels must be a whole number from 1 to 4096"
    for key in ("size", "max_size"):
        value = spec.preprocess.get(key)
        if (key == "size" or value is not None) and not (
                _is_number(value) and MIN_INPUT_SIDE <= value <= MAX_INPUT_SIDE):
            return f"preprocess.{key} must be a number of pixels from {MIN_INPUT_SIDE} to {MAX_INPUT_SIDE}, got {value!r}"
    if not (isinstance(spec.box_weights, list) and len(spec.box_weights) == 4 and all(map(_is_number, spec.box_weights))):
        return "box_weights must be 4 numbers"
    if not _is_number(spec.delta_clamp) or not _is_number(spec.anchor_offset):
        return "delta_clamp and anchor_offset must be numbers"
    return None



def default_mobilenet_spec(
    fpn_channels: int = 128,
    mid_channels: int = 128,
    sizes_per_level: tuple = ((16, 32), (64, 128), (256, 512)),
    ratios: tuple = (0.5, 1.0, 2.0),
    shorter_side: int = 512,
    max_size: int = 853,
) -> ModelSpec:
    """The architecture of the shipped default: MobileNetV2 + FPN at strides 8/16/32."""
    strides = (8, 16, 32)
    levels = []
    for stride, sizes in zip(strides, sizes_per_level):
        scales = [size / stride for size in sizes]
        levels.append({"stride": stride, "ratios": list(ratios), "scales": scales,
                       "anchors": anchor_shapes(stride, ratios, scales).tolist()})
    return ModelSpec(
        backbone={"name": "mobilenet_v2_fpn", "fpn_channels": fpn_channels},
        levels=levels,
        head={"mid_channels": mid_channels},
        score="sigmoid",
        preprocess=imagenet_preprocess(shorter_side, max_size),
    )



def imagenet_preprocess(shorter_side: int, max_size: int | None, interpolation: str = "bilinear") -> dict:
    return {
        "resize": "shorter_side",
        "size": shorter_side,
        "max_size": max_size,
        "interpolation": interpolation,
        "channel_order": "RGB",
        "scale": 1.0 / 255.0,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }



def seed_project_spec() -> ModelSpec:
    """The seed project's ResNet-50 C4 RPN with its conventions (notes: 'original project')."""
    ratios, scales = [0.5, 1.0, 2.0], [8.0, 16.0, 32.0]
    return ModelSpec(
        backbone={"name": "resnet50-c4"},
        levels=[{"stride": 16, "ratios": ratios, "scales": scales, "anchor_order": "seed-project (x/y transposed)",
                 "anchors": seed_project_anchor_shapes(16, ratios, scales).tolist()}],
        head={"mid_channels": 512},
        score="softmax2",
        preprocess={
            "resize": "shorter_side",
            "size": 600,
            "max_size": None,
            "interpolation": "bicubic",
            "channel_order": "RGB",
            "scale": 1.0 / 255.0,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
        },
    )
