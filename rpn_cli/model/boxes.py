"""Box coding between anchors and (dx, dy, dw, dh) deltas, and box geometry helpers.

All boxes are (x1, y1, x2, y2) float32 tensors of shape (N, 4); decoding, clipping and the
validity mask also take a batch, (B, N, 4), with anchors (N, 4) shared by the batch or (B, N, 4).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# torchvision and detectron2 clamp dw, dh here: exp() of a larger value gives
# boxes over 1000 / 16 times the anchor, and inf on a diverging model.
DEFAULT_DELTA_CLAMP = math.log(1000.0 / 16)


def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(centre x, centre y, width, height) of boxes (..., 4), each (...)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def decode_deltas(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = DEFAULT_DELTA_CLAMP,
) -> torch.Tensor:
    """Apply deltas (N, 4) or (B, N, 4) to anchors (N, 4) or (B, N, 4); returns boxes shaped like the
    deltas, float32.

    The seed's ``loc2bbox`` plus the clamp of dw, dh at ``clamp``. ``weights``
    divide the deltas, as in torchvision's ``BoxCoder``.
    """
    ctr_x, ctr_y, widths, heights = _centres_and_sizes(anchors.to(torch.float32))
    deltas = deltas.to(torch.float32)
    wx, wy, ww, wh = weights
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = torch.clamp(deltas[..., 2] / ww, max=clamp)
    dh = torch.clamp(deltas[..., 3] / wh, max=clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        (
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ),
        dim=-1,
    )


def encode_boxes(
    anchors: torch.Tensor,
    boxes: torch.Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float = DEFAULT_DELTA_CLAMP,
) -> torch.Tensor:
    """The inverse of :func:`decode_deltas`: deltas (N, 4) that move anchors (N, 4) onto boxes (N, 4).

    dw, dh are clamped at ``clamp`` like the decoder, so targets never ask for
    what the decoder cannot give.
    """
    ax, ay, aw, ah = _centres_and_sizes(anchors.to(torch.float32))
    bx, by, bw, bh = _centres_and_sizes(boxes.to(torch.float32))
    wx, wy, ww, wh = weights
    dx = wx * (bx - ax) / aw
    dy = wy * (by - ay) / ah
    dw = ww * torch.clamp(torch.log(bw / aw), max=clamp)
    dh = wh * torch.clamp(torch.log(bh / ah), max=clamp)
    return torch.stack((dx, dy, dw, dh), dim=1)


def clip_boxes(boxes: torch.Tensor, height: float | torch.Tensor, width: float | torch.Tensor) -> torch.Tensor:
    """Clip boxes (N, 4) to the image ``[0, width] x [0, height]``; or a batch (B, N, 4), each image to
    its own size when ``height`` and ``width`` are tensors (B, 1)."""
    if isinstance(height, torch.Tensor):
        if height.shape != (boxes.shape[0], 1) or width.shape != height.shape:
            raise ValueError(f"per-image sizes must be ({boxes.shape[0]}, 1), got {tuple(height.shape)}")
        x = boxes[..., 0::2].clamp(min=0.0).minimum(width[..., None].to(boxes.dtype))
        y = boxes[..., 1::2].clamp(min=0.0).minimum(height[..., None].to(boxes.dtype))
    else:
        x = boxes[..., 0::2].clamp(min=0.0, max=float(width))
        y = boxes[..., 1::2].clamp(min=0.0, max=float(height))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def valid_box_mask(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Boxes (..., 4) that are finite and at least ``min_size`` wide and tall: bool (...)."""
    finite = torch.isfinite(boxes).all(dim=-1)
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return finite & (widths >= min_size) & (heights >= min_size)


def scale_boxes(boxes: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """Divide x by ``scale_x`` and y by ``scale_y``: resized-image pixels back to the original's."""
    factors = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype, device=boxes.device)
    return boxes / factors

