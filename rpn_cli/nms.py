"""Greedy non-maximum suppression that stops once it has kept enough boxes.

torchvision's CPU ``nms`` runs the suppression over every box even when only
the first ``post_nms_top_n`` survivors are wanted. Stopping there gives the
same first ``max_keep`` indices (the same float32 IoU and ``>`` test, the same
stable score order) for a fraction of the work: see ``benchmarks/benchmark_nms.py``.
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int) -> torch.Tensor:
    """Indices (K,) of the boxes (N, 4) that greedy NMS keeps, best score first, K <= ``max_keep``.

    Equals ``torchvision.ops.nms(boxes, scores, iou_threshold)[:max_keep]``.
    """
    if boxes.numel() == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ordered = boxes[order].to(torch.float32).cpu().numpy()
    x1, y1, x2, y2 = (np.ascontiguousarray(ordered[:, i]) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    count = ordered.shape[0]
    suppressed = np.zeros(count, dtype=bool)
    keep = []
    threshold = np.float32(iou_threshold)
    for i in range(count):
        if suppressed[i]:
            continue
        keep.append(i)
        if len(keep) == max_keep:
            break
        rest = slice(i + 1, count)
        width = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        height = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = width * height
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap > threshold
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]
