"""Training targets as in Faster R-CNN: anchor labels by IoU, sampling, regression targets, and the losses on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from ..model.boxes import decode_deltas, encode_boxes

IGNORE, NEGATIVE, POSITIVE = -1, 0, 1
BOX_LOSSES = ("smooth-l1", "giou")


@dataclass(frozen=True)
class TargetSettings:
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    samples_per_image: int = 256
    positive_fraction: float = 0.5
    allowed_border: float = 0.0


def label_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, image_height: int, image_width: int,
    settings: TargetSettings = TargetSettings(), ignore_boxes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (M,) in {-1, 0, 1} and the matched ground-truth box (M, 4) of each anchor (M, 4).

    Positive: IoU >= ``positive_iou`` with a box, or (one of) the best anchor(s)
    of a box. Negative: best IoU < ``negative_iou``. Anchors crossing the image
    border by more than ``allowed_border`` are ignored. With no boxes, every
    inside anchor is negative and the matched boxes are the anchors themselves.
    ``ignore_boxes`` (R, 4): regions where nothing is known (an object may be there unlabelled): a
    negative anchor overlapping one by ``negative_iou`` or more is ignored instead.
    """
    labels, matched = match_anchors(anchors, gt_boxes, image_height, image_width, settings, ignore_boxes)
    return labels, (gt_boxes.to(anchors)[matched] if gt_boxes.numel() else anchors.clone())


def match_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, image_height: int, image_width: int,
    settings: TargetSettings = TargetSettings(), ignore_boxes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`label_anchors`, with the index (M,) of each anchor's best box in place of the box
    (all 0 when there are no boxes)."""
    border = settings.allowed_border
    inside = (
        (anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
        & (anchors[:, 2] <= image_width + border) & (anchors[:, 3] <= image_height + border)
    )
    labels = torch.full((anchors.shape[0],), IGNORE, dtype=torch.int64, device=anchors.device)
    if gt_boxes.numel() == 0:
        labels[inside] = NEGATIVE
        _ignore_unknown(labels, anchors, ignore_boxes, settings)
        return labels, torch.zeros_like(labels)
    iou = box_iou(anchors, gt_boxes.to(anchors))
    iou[~inside] = -1.0
    best_iou, best_gt = iou.max(dim=1)
    labels[inside & (best_iou < settings.negative_iou)] = NEGATIVE
    labels[best_iou >= settings.positive_iou] = POSITIVE
    gt_best = iou.max(dim=0).values
    # An anchor is a box's best if it reaches that box's best IoU (ties included), when that is > 0.
    is_best = ((iou == gt_best.unsqueeze(0)) & (gt_best.unsqueeze(0) > 0)).any(dim=1)
    labels[is_best & inside] = POSITIVE
    _ignore_unknown(labels, anchors, ignore_boxes, settings)
    return labels, best_gt


def _ignore_unknown(labels: torch.Tensor, anchors: torch.Tensor, ignore_boxes: torch.Tensor | None,
                    settings: TargetSettings) -> None:
    if ignore_boxes is None or ignore_boxes.numel() == 0:
        return
    near = box_iou(anchors, ignore_boxes.to(anchors)).max(dim=1).values >= settings.negative_iou
    labels[near & (labels == NEGATIVE)] = IGNORE


def sample_labels(labels: torch.Tensor, settings: TargetSettings, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``samples_per_image`` labelled anchors, at most ``positive_fraction`` positive;
    the rest become ignored. Random choice from ``generator`` (CPU)."""
    labels = labels.clone()
    positives = torch.nonzero(labels == POSITIVE).flatten()
    negatives = torch.nonzero(labels == NEGATIVE).flatten()
    max_positive = int(settings.samples_per_image * settings.positive_fraction)
    if positives.numel() > max_positive:
        drop = positives[torch.randperm(positives.numel(), generator=generator)[max_positive:].to(labels.device)]
        labels[drop] = IGNORE
    max_negative = settings.samples_per_image - min(positives.numel(), max_positive)
    if negatives.numel() > max_negative:
        drop = negatives[torch.randperm(negatives.numel(), generator=generator)[max_negative:].to(labels.device)]
        labels[drop] = IGNORE
    return labels


def rpn_losses(
    levels, images_boxes: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]], score_kind: str,
    box_weights, delta_clamp: float, targets: TargetSettings, generator: torch.Generator,
    images_ignore: Sequence[torch.Tensor] | None = None, images_confidence: Sequence[torch.Tensor] | None = None,
    box_loss: str = "smooth-l1", images_weight: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Objectness and box losses of a batch.

    levels: the model's :class:`LevelOutput` list; images_boxes[i]: (K_i, 4) in resized pixels;
    image_sizes[i]: (width, height) of image i before padding; images_ignore[i]: (R_i, 4) regions in
    resized pixels where negatives are ignored; images_confidence[i]: (K_i,) the objectness target of
    a positive anchor matched to each box (soft targets, sigmoid scores only; default 1);
    images_weight[i]: (K_i,) how much a positive anchor matched to each box counts in both losses
    (confidence-weighted distillation; negatives and the default count 1). box_loss:
    ``smooth-l1`` on the encoded deltas (torchvision's, beta 1/9) or ``giou``, 1 - generalized IoU of
    the decoded box and its match (detectron2's ``giou``), which weighs localisation in pixels of overlap
    rather than in log-size units. Both are summed over positives and divided by the sampled anchors.
    """
    anchors = torch.cat([level.anchors for level in levels])
    cls_terms, box_terms, sampled_total = [], [], 0
    for index, (boxes, (width, height)) in enumerate(zip(images_boxes, image_sizes)):
        ignore = images_ignore[index] if images_ignore is not None else None
        labels, matched_index = match_anchors(anchors, boxes, height, width, targets, ignore)
        matched = boxes.to(anchors)[matched_index] if boxes.numel() else anchors
        labels = sample_labels(labels, targets, generator)
        sampled = torch.nonzero(labels >= NEGATIVE).flatten()
        positive = torch.nonzero(labels == POSITIVE).flatten()
        sampled_total += sampled.numel()
        logits = torch.cat([level.logits[index] for level in levels]).float()
        anchor_weight = torch.ones(anchors.shape[0], device=logits.device)  # (A,)
        if images_weight is not None and positive.numel():
            anchor_weight[positive] = images_weight[index].to(logits)[matched_index[positive]]
        if score_kind == "sigmoid":
            wanted_scores = labels.float()
            if images_confidence is not None and positive.numel():
                wanted_scores[positive] = images_confidence[index].to(logits)[matched_index[positive]]
            cls_terms.append(F.binary_cross_entropy_with_logits(
                logits[sampled], wanted_scores[sampled], weight=anchor_weight[sampled], reduction="sum"))
        else:
            cls_terms.append((F.cross_entropy(logits[sampled], labels[sampled], reduction="none")
                              * anchor_weight[sampled]).sum())
        deltas = torch.cat([level.deltas[index] for level in levels]).float()  # float32 under autocast too
        if positive.numel() and box_loss == "giou":
            predicted = decode_deltas(anchors[positive], deltas[positive], box_weights, delta_clamp)
            box_terms.append((generalized_box_iou_loss(predicted, matched[positive].float(), reduction="none")
                              * anchor_weight[positive]).sum())
        elif positive.numel():
            wanted = encode_boxes(anchors[positive], matched[positive], box_weights, delta_clamp)
            box_terms.append((F.smooth_l1_loss(deltas[positive], wanted, beta=1.0 / 9, reduction="none").sum(dim=1)
                              * anchor_weight[positive]).sum())
    normaliser = max(sampled_total, 1)
    objectness_loss = torch.stack(cls_terms).sum() / normaliser
    box_loss = torch.stack(box_terms).sum() / normaliser if box_terms else deltas.sum() * 0.0
    return {"objectness": objectness_loss, "box": box_loss}
