"""Greedy non-maximum suppression that stops once it has kept enough boxes.

torchvision's CPU ``nms`` runs the suppression over every box even when only
the first ``post_nms_top_n`` survivors are wanted. Here boxes are taken in
score order a window at a time: a box can only be suppressed by a better one,
so once ``max_keep`` boxes are kept, the boxes after the window cannot change
the answer and are never looked at. The result is the same first ``max_keep``
indices (the same float32 IoU and ``>`` test, the same stable score order) for
a fraction of the work: see ``benchmarks/benchmark_nms.py``.
"""

from __future__ import annotations

import numpy as np
import torch


def _overlaps(box: np.ndarray, others: np.ndarray, box_area, other_areas: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) or of boxes (K, 1, 4) with ``others`` (M, 4), in torchvision's float32 arithmetic."""
    zero = np.float32(0)
    width = np.maximum(zero, np.minimum(box[..., 2], others[:, 2]) - np.maximum(box[..., 0], others[:, 0]))
    height = np.maximum(zero, np.minimum(box[..., 3], others[:, 3]) - np.maximum(box[..., 1], others[:, 1]))
    inter = width * height
    return inter / (box_area + other_areas - inter)


# Boxes kept in earlier windows are tested against a new window this many at a time: (block, window)
# temporaries small enough to stay in cache.
_KEPT_BLOCK = 16


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int,
               window: int = 1024) -> torch.Tensor:
    """Indices (K,) of the boxes (N, 4) that greedy NMS keeps, best score first, K <= ``max_keep``.

    Equals ``torchvision.ops.nms(boxes, scores, iou_threshold)[:max_keep]``. ``window``: how many
    boxes are looked at first (the window doubles while fewer than ``max_keep`` are kept).
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if boxes.numel() == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ordered = boxes[order].to(torch.float32).cpu().numpy()
    areas = (ordered[:, 2] - ordered[:, 0]) * (ordered[:, 3] - ordered[:, 1])
    # torchvision compares the float32 IoU with the threshold as a double: so does a float64 scalar here.
    threshold = np.float64(iou_threshold)
    count = ordered.shape[0]
    keep: list[int] = []
    start = 0
    while start < count and len(keep) < max_keep:
        stop = min(count, start + window)
        part, part_areas = ordered[start:stop], areas[start:stop]
        suppressed = np.zeros(stop - start, dtype=bool)
        for block in range(0, len(keep), _KEPT_BLOCK):
            kept = np.asarray(keep[block:block + _KEPT_BLOCK])
            overlaps = _overlaps(ordered[kept][:, None, :], part, areas[kept][:, None], part_areas)
            suppressed |= (overlaps > threshold).any(0)
        for i in range(stop - start):
            if suppressed[i]:
                continue
            keep.append(start + i)
            if len(keep) == max_keep:
                break
            suppressed[i + 1:] |= _overlaps(part[i], part[i + 1:], part_areas[i], part_areas[i + 1:]) > threshold
        start, window = stop, window * 2
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]
