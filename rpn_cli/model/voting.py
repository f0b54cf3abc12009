"""Box voting: after NMS, each kept box moves to the score-weighted mean of the candidates overlapping it.

NMS keeps the best-scored box of each cluster and throws its neighbours away, but their positions are
evidence too: averaged by score they localise the object better than the one box does (Gidaris and
Komodakis, ICCV 2015; detectron's ``box_voting``). Scores and order are unchanged. Only the
``VOTING_CANDIDATES`` best candidates vote: they carry nearly all the weight, and the cost of the overlaps
grows with their number (on the shipped checkpoint's validation photos 1,000 kept the gain of all of them).

Shapes: K kept boxes, C candidates, optionally a leading batch dimension N on all three inputs.
"""

from __future__ import annotations

import torch

VOTING_CANDIDATES = 1000


def pairwise_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU (..., K, C) of boxes (..., K, 4) with others (..., C, 4), x1y1x2y2; 0 where a union is empty."""
    left_top = torch.maximum(boxes[..., :, None, :2], others[..., None, :, :2])
    right_bottom = torch.minimum(boxes[..., :, None, 2:], others[..., None, :, 2:])
    overlap = (right_bottom - left_top).clamp(min=0).prod(dim=-1)
    areas = (boxes[..., 2:] - boxes[..., :2]).prod(dim=-1)
    other_areas = (others[..., 2:] - others[..., :2]).prod(dim=-1)
    union = areas[..., :, None] + other_areas[..., None, :] - overlap
    return torch.where(union > 0, overlap / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def vote_boxes(kept: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor, iou_threshold: float,
               max_candidates: int = VOTING_CANDIDATES) -> torch.Tensor:
    """Each kept box (..., K, 4) replaced by the mean of the candidates (..., C, 4) that overlap it by
    ``iou_threshold`` or more, weighted by their ``weights`` (..., C) (objectness; 0 for a candidate that
    must not vote); only the ``max_candidates`` of highest weight vote. A kept box that no candidate
    overlaps enough stays as it is. Returns (..., K, 4) float32."""
    kept, candidates, weights = kept.float(), candidates.float(), weights.float()
    if weights.shape[-1] > max_candidates:
        weights, best = weights.topk(max_candidates, dim=-1)
        candidates = candidates.gather(-2, best[..., None].expand(*best.shape, 4))
    votes = (pairwise_iou(kept, candidates) >= iou_threshold) * weights[..., None, :]
    total = votes.sum(dim=-1, keepdim=True)
    voted = (votes @ candidates) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, voted, kept)
