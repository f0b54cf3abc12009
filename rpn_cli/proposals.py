"""The proposal layer: from per-anchor scores and deltas to a ranked, NMS-ed set of boxes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
from torchvision.ops import batched_nms, nms

from .boxes import DEFAULT_DELTA_CLAMP, clip_boxes, decode_deltas, valid_box_mask
from .errors import UsageError


@dataclass(frozen=True)
class ProposalSettings:
    """Limits of the proposal layer. Test mode by default; :meth:`training` gives the seed's 12000 / 600."""

    pre_nms_top_n: int = 3000
    post_nms_top_n: int = 300
    nms_iou: float = 0.7
    min_size: float = 16.0
    min_score: float = 0.0
    nms_per_level: bool = False

    @classmethod
    def training(cls, **overrides) -> "ProposalSettings":
        return replace(cls(pre_nms_top_n=12000, post_nms_top_n=600), **overrides)

    def validated(self) -> "ProposalSettings":
        if self.pre_nms_top_n < 1 or self.post_nms_top_n < 1:
            raise UsageError("pre-NMS and post-NMS limits must be at least 1")
        if not 0.0 < self.nms_iou <= 1.0:
            raise UsageError(f"NMS IoU must be in (0, 1], got {self.nms_iou}")
        if self.min_size < 0:
            raise UsageError(f"min size must be >= 0, got {self.min_size}")
        if not 0.0 <= self.min_score <= 1.0:
            raise UsageError(f"min score must be in [0, 1], got {self.min_score}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def proposals_for_image(
    scores: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    image_height: int,
    image_width: int,
    settings: ProposalSettings = ProposalSettings(),
    box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    delta_clamp: float = DEFAULT_DELTA_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposals of one image from its per-level outputs.

    scores[l]: (M_l,) objectness probabilities; deltas[l]: (M_l, 4); anchors[l]: (M_l, 4),
    all in the resized image's pixels, whose size is ``image_height x image_width``.

    Per level: decode (float32, dw/dh clamped), clip to the image, drop
    non-finite boxes and boxes under ``min_size``, keep the top
    ``pre_nms_top_n`` by score. Then one NMS (across levels, or per level when
    ``nms_per_level``) and the top ``post_nms_top_n``. Returns boxes (K, 4) and
    scores (K,), float32, sorted by score high to low; K may be 0.
    """
    level_boxes, level_scores, level_ids = [], [], []
    for level, (level_score, level_delta, level_anchor) in enumerate(zip(scores, deltas, anchors)):
        level_score = level_score.to(torch.float32)
        boxes = decode_deltas(level_anchor, level_delta, box_weights, delta_clamp)
        boxes = clip_boxes(boxes, image_height, image_width)
        keep = valid_box_mask(boxes, settings.min_size) & torch.isfinite(level_score)
        if settings.min_score > 0:
            keep &= level_score >= settings.min_score
        boxes, level_score = boxes[keep], level_score[keep]
        if level_score.numel() > settings.pre_nms_top_n:
            level_score, order = torch.topk(level_score, settings.pre_nms_top_n, sorted=True)
            boxes = boxes[order]
        level_boxes.append(boxes)
        level_scores.append(level_score)
        level_ids.append(torch.full((boxes.shape[0],), level, dtype=torch.int64, device=boxes.device))
    boxes = torch.cat(level_boxes)
    score = torch.cat(level_scores)
    if boxes.shape[0] == 0:
        return boxes.reshape(0, 4), score
    if settings.nms_per_level:
        keep = batched_nms(boxes, score, torch.cat(level_ids), settings.nms_iou)
    else:
        keep = nms(boxes, score, settings.nms_iou)
    keep = keep[: settings.post_nms_top_n]
    return boxes[keep], score[keep]
