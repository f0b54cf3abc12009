"""The Region Proposal Network: a backbone, the seed's head, and the description that defines both.

:class:`ModelSpec` is everything needed to rebuild a model and use it
correctly (it is stored as JSON inside each checkpoint); nothing about a
checkpoint is guessed at load time.

Shapes, as the docstrings of this package name them:

- N: images in a batch; H, W: the padded batch's height and width in pixels (the resized images,
  zero-padded at the bottom and right to a multiple of ``size_divisible``).
- L: feature levels (strides such as 8, 16, 32), finest first; Hl, Wl: level l's feature map.
- A: anchors per location (the same at every level); M_l = Hl * Wl * A anchors of level l, ordered
  row-major over (y, x) and then by anchor, as the head's channels are; M = sum of M_l.
- logits: (N, A, Hl, Wl) per level from the head (one sigmoid logit per anchor, or A * 2 channels
  for the seed's softmax pairs); deltas: (N, 4A, Hl, Wl), (dx, dy, dw, dh) per anchor.
- boxes: (K, 4) float32 x1, y1, x2, y2 (x right, y down), in the resized image's pixels inside the
  network and the proposal layer, in the original image's pixels once returned to a caller.
- K: proposals kept for an image (at most ``post_nms_top_n``, possibly 0); scores: (K,) in [0, 1].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .anchors import anchor_shapes, cached_grid_anchors, seed_project_anchor_shapes
from .backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from .boxes import DEFAULT_DELTA_CLAMP
from .errors import CheckpointError
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


class RPNHead(nn.Module):
    """3x3 conv + ReLU (``conv_depth`` of them), then 1x1 objectness and 1x1 box deltas, shared across levels.

    ``score_channels`` is 1 for sigmoid scores, 2 for the seed's softmax pairs.
    """

    def __init__(self, in_channels: int, mid_channels: int, anchors: int, score_channels: int, conv_depth: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.more_convs = nn.ModuleList(nn.Conv2d(mid_channels, mid_channels, 3, 1, 1) for _ in range(conv_depth - 1))
        self.score = nn.Conv2d(mid_channels, anchors * score_channels, 1, 1, 0)
        self.loc = nn.Conv2d(mid_channels, anchors * 4, 1, 1, 0)
        for layer in (self.conv1, *self.more_convs, self.score, self.loc):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        outputs = []
        for feature in features:
            hidden = torch.relu(self.conv1(feature))
            for conv in self.more_convs:
                hidden = torch.relu(conv(hidden))
            outputs.append((self.score(hidden), self.loc(hidden)))
        return outputs


@dataclass
class LevelOutput:
    """Head output of one level, flattened in anchor order ``(y * W + x) * A + a``.

    logits: (N, H*W*A) for sigmoid, (N, H*W*A, 2) for softmax pairs;
    deltas: (N, H*W*A, 4); anchors: (H*W*A, 4) in resized-image pixels.
    """

    logits: torch.Tensor
    deltas: torch.Tensor
    anchors: torch.Tensor
    height: int
    width: int


class RegionProposalNetwork(nn.Module):
    """Backbone + head; ``forward`` gives per-level logits, deltas and anchors.

    The network runs in the dtype of its weights (``rpn_cli.export.load_model`` converts them for
    ``--precision``); :attr:`precision` names it.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = build_backbone(spec.backbone)
        strides = [int(level["stride"]) for level in spec.levels]
        if strides != list(self.backbone.strides):
            raise CheckpointError(
                f"levels at strides {strides} do not match backbone {spec.backbone['name']} ({self.backbone.strides})"
            )
        score_channels = 1 if spec.score == "sigmoid" else 2
        in_channels = self.backbone.out_channels[0]
        self.head = RPNHead(in_channels, int(spec.head["mid_channels"]), spec.anchors_per_location, score_channels,
                            int(spec.head.get("conv_depth", 1)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def channels_last(self) -> bool:
        return bool(self.backbone.channels_last)

    def raw_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The network alone (what ``rpn export`` writes): per level, objectness (N, A*k, H, W) then
        deltas (N, 4A, H, W), levels finest first, flattened into one list."""
        outputs = []
        for score, loc in self.head(self.backbone(images)):
            outputs.extend((score, loc))
        return outputs

    def forward(self, images: torch.Tensor) -> list[LevelOutput]:
        """images: (N, 3, H, W), preprocessed."""
        return flatten_outputs(self.spec, self.raw_outputs(images), tuple(images.shape[2:]))


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each inference-mode BatchNorm into the convolution that feeds it; returns how many.

    A convolution feeds a BatchNorm when it comes right before it in an ``nn.Sequential`` (or
    torchvision's ``IntermediateLayerGetter``), or, in torchvision's ResNet blocks, when they are
    named ``conv<k>`` and ``bn<k>``.
    For inference only (``module`` in eval mode): the folded model computes the same function
    with one layer fewer.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("fold_batchnorm is for inference: put the model in eval mode first")
    pairs = []
    for parent in module.modules():
        names = list(parent._modules)
        # torchvision's IntermediateLayerGetter, like a Sequential, runs its children in order.
        if isinstance(parent, nn.Sequential) or type(parent).__name__ == "IntermediateLayerGetter":
            pairs.extend((parent, a, b) for a, b in zip(names, names[1:]))
        elif type(parent).__module__ == "torchvision.models.resnet":
            pairs.extend((parent, name, "bn" + name[4:]) for name in names
                         if name.startswith("conv") and name[4:].isdigit() and "bn" + name[4:] in names)
    folded = 0
    for parent, conv_name, norm_name in pairs:
        conv, norm = parent._modules[conv_name], parent._modules[norm_name]
        if type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and norm.track_running_stats:
            parent._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
            parent._modules[norm_name] = nn.Identity()
            folded += 1
    return folded


def flatten_outputs(spec: ModelSpec, raw: list[torch.Tensor], image_size: tuple[int, int]) -> list[LevelOutput]:
    """Per-level :class:`LevelOutput` from :meth:`RegionProposalNetwork.raw_outputs` (or an exported
    model's outputs), with the anchors of each level for a padded batch of ``image_size`` (H, W)."""
    outputs = []
    for index, level in enumerate(spec.levels):
        score, loc = raw[2 * index], raw[2 * index + 1]
        n, _, height, width = score.shape
        shapes = torch.tensor(level["anchors"], dtype=torch.float32)
        if spec.score == "sigmoid":
            logits = score.permute(0, 2, 3, 1).reshape(n, -1)
        else:
            logits = score.permute(0, 2, 3, 1).reshape(n, -1, 2)
        deltas = loc.permute(0, 2, 3, 1).reshape(n, -1, 4)
        if spec.anchor_stride == "image_over_grid":
            stride = (image_size[0] // height, image_size[1] // width)
        else:
            stride = level["stride"]
        anchors = cached_grid_anchors(shapes, stride, height, width, spec.anchor_offset, score.device)
        if anchors.shape[0] != deltas.shape[1]:
            raise CheckpointError("anchor grid does not match the head's output")
        outputs.append(LevelOutput(logits, deltas, anchors, height, width))
    return outputs


def objectness(logits: torch.Tensor, score_kind: str) -> torch.Tensor:
    """Objectness probabilities (N, M) in float32 from logits of either score kind."""
    logits = logits.float()
    if score_kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)[..., 1]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
