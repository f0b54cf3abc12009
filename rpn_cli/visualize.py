"""Pictures: proposals drawn over their image, and anchors over an image or a blank canvas."""

from __future__ import annotations

import colorsys

import torch
from PIL import Image, ImageDraw

from .anchors import grid_anchors
from .predict import ImageProposals

_LEVEL_COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255)]


def score_colour(score: float) -> tuple[int, int, int]:
    """Blue for low scores through green and yellow to red for high ones."""
    hue = (1.0 - max(0.0, min(1.0, score))) * 2.0 / 3.0
    r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _caption(draw: ImageDraw.ImageDraw, text: str, width: int) -> None:
    box = draw.textbbox((4, 4), text)
    draw.rectangle((0, 0, min(width, box[2] + 6), box[3] + 4), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))


def draw_proposals(image: Image.Image, proposals: ImageProposals, top: int) -> Image.Image:
    """The image with its ``top`` best proposals outlined, coloured by score, and a caption saying
    how many were drawn. Lower scores are drawn first so the best stay on top."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    count = min(top, int(proposals.scores.numel()))
    line = max(1, round(min(canvas.size) / 300))
    for index in reversed(range(count)):
        x1, y1, x2, y2 = proposals.boxes[index].tolist()
        draw.rectangle((x1, y1, x2, y2), outline=score_colour(float(proposals.scores[index])), width=line)
    if count:
        low, high = float(proposals.scores[count - 1]), float(proposals.scores[0])
        text = f"top {count} of {proposals.scores.numel()} proposals drawn (score {high:.2f} to {low:.2f})"
    else:
        text = "no proposals"
    _caption(draw, text, canvas.width)
    return canvas


def draw_anchors(levels: list[dict], canvas: Image.Image, offset: float = 0.0) -> Image.Image:
    """Anchor centres of every level as dots over ``canvas`` and each level's shapes at the centre cell
    nearest the middle, one colour per level."""
    picture = canvas.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for number, level in enumerate(levels):
        colour = _LEVEL_COLOURS[number % len(_LEVEL_COLOURS)]
        stride = float(level["stride"])
        cols, rows = int(width // stride) + 1, int(height // stride) + 1
        dot = max(1, int(stride // 8))
        for y in range(rows):
            for x in range(cols):
                cx, cy = (x + offset) * stride, (y + offset) * stride
                draw.ellipse((cx - dot / 2, cy - dot / 2, cx + dot / 2, cy + dot / 2), fill=colour)
        shapes = torch.tensor(level["anchors"], dtype=torch.float32)
        centre_x = round(width / 2 / stride - offset) * stride
        centre_y = round(height / 2 / stride - offset) * stride
        placed = grid_anchors(shapes, 1.0, 1, 1, 0.0) + torch.tensor([centre_x, centre_y, centre_x, centre_y])
        for box in placed.tolist():
            draw.rectangle(box, outline=colour, width=2)
    legend = ", ".join(f"stride {level['stride']}: {len(level['anchors'])} anchors" for level in levels)
    _caption(draw, legend, width)
    return picture
