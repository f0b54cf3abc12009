"""The Region Proposal Network: a backbone and the seed's head, built from a :class:`ModelSpec`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import CheckpointError
from .anchors import cached_grid_anchors
from .backbones import build_backbone
from .spec import ModelSpec


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
        strides = [level.stride for level in spec.levels]
        if strides != list(self.backbone.strides):
            raise CheckpointError(
                f"levels at strides {strides} do not match backbone {spec.backbone.name} ({self.backbone.strides})"
            )
        score_channels = 1 if spec.score == "sigmoid" else 2
        in_channels = self.backbone.out_channels[0]
        self.head = RPNHead(in_channels, spec.head.mid_channels, spec.anchors_per_location, score_channels,
                            spec.head.conv_depth)

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


def deepened_head(model: RegionProposalNetwork, conv_depth: int) -> RegionProposalNetwork:
    """``model`` with ``conv_depth`` 3x3 convolutions in its head, the added ones after its own, each
    starting as the identity (a Dirac kernel, zero bias): their inputs are ReLU outputs, >= 0, which a
    ReLU leaves as they are, so the deeper network computes exactly what ``model`` did and training goes
    on from its proposals. A new model (same device, dtype and mode); ``model`` is left as it is."""
    depth = model.spec.head.conv_depth
    if conv_depth < depth:
        raise ValueError(f"a head of {depth} convolutions cannot be made {conv_depth} deep")
    deeper = RegionProposalNetwork(replace(model.spec, head=replace(model.spec.head, conv_depth=conv_depth)))
    added = {f"head.more_convs.{index}.{name}" for index in range(depth - 1, conv_depth - 1)
             for name in ("weight", "bias")}
    missing, unexpected = deeper.load_state_dict(model.state_dict(), strict=False)
    if set(missing) != added or unexpected:  # anything but the new convolutions: a bug, not a user's error
        raise RuntimeError(f"deepened_head: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for conv in deeper.head.more_convs[depth - 1:]:
            nn.init.dirac_(conv.weight)
            nn.init.zeros_(conv.bias)
    return deeper.to(model.device, model.dtype).train(model.training)


def flatten_outputs(spec: ModelSpec, raw: list[torch.Tensor], image_size: tuple[int, int]) -> list[LevelOutput]:
    """Per-level :class:`LevelOutput` from :meth:`RegionProposalNetwork.raw_outputs` (or an exported
    model's outputs), with the anchors of each level for a padded batch of ``image_size`` (H, W)."""
    outputs = []
    for index, level in enumerate(spec.levels):
        score, loc = raw[2 * index], raw[2 * index + 1]
        n, _, height, width = score.shape
        shapes = torch.tensor(level.anchors, dtype=torch.float32)
        if spec.score == "sigmoid":
            logits = score.permute(0, 2, 3, 1).reshape(n, -1)
        else:
            logits = score.permute(0, 2, 3, 1).reshape(n, -1, 2)
        deltas = loc.permute(0, 2, 3, 1).reshape(n, -1, 4)
        if spec.anchor_stride == "image_over_grid":
            stride = (image_size[0] // height, image_size[1] // width)
        else:
            stride = level.stride
        anchors = cached_grid_anchors(shapes, stride, height, width, spec.anchor_offset, score.device)
        if anchors.shape[0] != deltas.shape[1]:
            raise CheckpointError("anchor grid does not match the head's output")
        outputs.append(LevelOutput(logits, deltas, anchors, height, width))
    return outputs


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


