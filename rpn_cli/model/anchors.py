"""Anchor boxes: the reference shapes at one location and their grid over a feature map.

Anchors are (x1, y1, x2, y2) boxes centred on 0. A ratio is height / width. The
order of shapes is ratio-major (for each ratio, every scale), as in the seed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch


def anchor_shapes(
    base_size: float = 16.0,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8.0, 16.0, 32.0),
) -> torch.Tensor:
    """Anchor boxes centred on 0, shape ``(len(ratios) * len(scales), 4)`` as (x1, y1, x2, y2).

    Shape ``i * len(scales) + j`` has area ``(base_size * scales[j]) ** 2`` and
    height / width ``ratios[i]``.
    """
    rows = []
    for ratio in ratios:
        for scale in scales:
            side = base_size * scale
            h = side * math.sqrt(ratio)
            w = side * math.sqrt(1.0 / ratio)
            rows.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    return torch.tensor(rows, dtype=torch.float32)


def seed_project_anchor_shapes(
    base_size: float = 16.0,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (8.0, 16.0, 32.0),
) -> torch.Tensor:
    """The seed project's anchors as its code uses them (notes, pitfall 1).

    Its ``generate_anchor_base`` writes (-h/2, -w/2, h/2, w/2) and the rest of its
    code reads that row as (x1, y1, x2, y2), so each shape is the transpose of
    what its ratio says. Checkpoints trained by that project need this order.
    """
    return anchor_shapes(base_size, ratios, scales)[:, [1, 0, 3, 2]]


def grid_anchors(
    shapes: torch.Tensor, stride: float | tuple[float, float], height: int, width: int, offset: float = 0.0
) -> torch.Tensor:
    """Shift ``shapes`` (A, 4) to every cell of a ``height x width`` map.

    ``stride`` is one number or (stride_y, stride_x). Cell (y, x) is centred at
    ((x + offset) * stride_x, (y + offset) * stride_y). Returns (height * width * A, 4),
    anchor ``(y * width + x) * A + a``, the order of a head's output after
    ``permute(0, 2, 3, 1).reshape(n, -1, 4)``.
    """
    stride_y, stride_x = stride if isinstance(stride, tuple) else (stride, stride)
    xs = (torch.arange(width, dtype=torch.float32) + offset) * stride_x
    ys = (torch.arange(height, dtype=torch.float32) + offset) * stride_y
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
    return (shifts + shapes.to(torch.float32).reshape(1, -1, 4)).reshape(-1, 4)


@lru_cache(maxsize=64)
def _cached_grid(shapes_key: tuple, stride: tuple, height: int, width: int, offset: float, device: str) -> torch.Tensor:
    shapes = torch.tensor(shapes_key, dtype=torch.float32)
    return grid_anchors(shapes, stride, height, width, offset).to(device)


def cached_grid_anchors(
    shapes: torch.Tensor, stride: float | tuple[float, float], height: int, width: int, offset: float,
    device: torch.device,
) -> torch.Tensor:
    """:func:`grid_anchors`, computed once per (shapes, stride, map size, device) (notes, pitfall 4)."""
    key = tuple(tuple(float(v) for v in row) for row in shapes.tolist())
    strides = tuple(float(v) for v in stride) if isinstance(stride, tuple) else (float(stride), float(stride))
    return _cached_grid(key, strides, int(height), int(width), float(offset), str(device))


def describe_anchor_shapes(shapes: torch.Tensor) -> list[dict]:
    """Width, height and height / width of each anchor shape, for tables and checks."""
    rows = []
    for index, (x1, y1, x2, y2) in enumerate(shapes.tolist()):
        w, h = x2 - x1, y2 - y1
        rows.append({"index": index, "width": w, "height": h, "ratio": h / w, "box": [x1, y1, x2, y2]})
    return rows
