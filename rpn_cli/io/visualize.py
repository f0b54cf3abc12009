"""Pictures: proposals drawn over their image, and anchors over an image or a blank canvas."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from ..model.anchors import grid_anchors
from ..model.proposals import ImageProposals
from ..model.spec import LevelSpec

_LEVEL_COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255)]


# Colours by rank, told apart on any photo: each line is drawn over a dark outline.
RANK_COLOURS = [(255, 59, 48), (255, 204, 0), (52, 199, 89), (0, 199, 255), (175, 82, 222),
                (255, 149, 0), (255, 45, 85), (90, 200, 250), (162, 132, 94), (88, 86, 214)]
OUTLINE = (0, 0, 0)
NUMBERED = 5  # the best few carry their rank


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, size))


def _caption(draw: ImageDraw.ImageDraw, text: str, width: int, size: int = 11) -> None:
    font = _font(size)
    box = draw.textbbox((4, 4), text, font=font)
    draw.rectangle((0, 0, min(width, box[2] + 6), box[3] + 4), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255), font=font)


def _draw_boxes(draw: ImageDraw.ImageDraw, boxes: list[list[float]], line: int, font_size: int,
                numbered: int = NUMBERED) -> None:
    """Boxes in rank order (best first in ``boxes``), drawn worst first so the best stay on top; each a
    colour by rank over a dark outline; the first ``numbered`` labelled 1, 2, ..."""
    font = _font(font_size)
    for rank in reversed(range(len(boxes))):
        x1, y1, x2, y2 = boxes[rank]
        colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
        width = line if rank < numbered else max(1, line - 1)
        draw.rectangle((x1, y1, x2, y2), outline=OUTLINE, width=width + 2)
        if x2 - x1 >= 2 and y2 - y1 >= 2:
            draw.rectangle((x1 + 1, y1 + 1, x2 - 1, y2 - 1), outline=colour, width=width)
        else:  # too thin for an outline inside it: the colour alone
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=1)
        if rank < numbered:
            label = str(rank + 1)
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tx, ty = x1 + 1, max(0, y1 + 1)
            draw.rectangle((tx, ty, tx + right - left + 6, ty + bottom - top + 6), fill=colour, outline=OUTLINE)
            draw.text((tx + 3 - left, ty + 3 - top), label, fill=OUTLINE, font=font)


def draw_proposals(image: Image.Image, proposals: ImageProposals, top: int) -> Image.Image:
    """The image with its ``top`` best proposals: colours by rank (scores of a good RPN are all near 1,
    so an absolute colour scale says nothing), the best few numbered, and below the image a legend
    with the scores (it covers nothing)."""
    photo = image.convert("RGB")
    side = min(photo.size)
    font_size = max(11, round(side / 45))
    strip = font_size + 10
    canvas = Image.new("RGB", (photo.width, photo.height + strip), (0, 0, 0))
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    count = min(top, int(proposals.scores.numel()))
    _draw_boxes(draw, proposals.boxes[:count].tolist(), max(2, round(side / 250)), round(side / 30))
    if count:
        low, high = float(proposals.scores[count - 1]), float(proposals.scores[0])
        text = (f"best {count} of {proposals.scores.numel()} proposals, numbered by rank; "
                f"scores {high:.4f} (1) to {low:.4f} ({count})")
    else:
        text = "no proposals"
    draw.text((4, photo.height + 5), text, fill=(255, 255, 255), font=_font(font_size))
    return canvas


def thumbnail_with_proposals(image: Image.Image, proposals: ImageProposals, top: int, size: int) -> Image.Image:
    """A ``size``-px thumbnail with its ``top`` best proposals (the best three numbered)."""
    thumbnail = image.convert("RGB").copy()
    thumbnail.thumbnail((size, size))
    scale = thumbnail.width / image.width
    count = min(top, int(proposals.scores.numel()))
    boxes = (proposals.boxes[:count] * scale).tolist()
    _draw_boxes(ImageDraw.Draw(thumbnail), boxes, 2, 11, numbered=3)
    return thumbnail


def contact_sheet(tiles: list[tuple[Image.Image, str]], size: int, columns: int = 6) -> Image.Image:
    """Thumbnails (at most ``size`` px a side) in a grid, each with its caption below."""
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    font = _font(11)
    caption_height = 16
    cell = (size + 8, size + caption_height + 8)
    sheet = Image.new("RGB", (columns * cell[0] + 8, rows * cell[1] + 8), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for index, (tile, caption) in enumerate(tiles):
        x, y = 8 + (index % columns) * cell[0], 8 + (index // columns) * cell[1]
        sheet.paste(tile, (x + (size - tile.width) // 2, y + (size - tile.height) // 2))
        while caption and draw.textlength(caption, font=font) > size:
            caption = "…" + caption[2:]
        draw.text((x, y + size + 2), caption, fill=(230, 230, 230), font=font)
    return sheet


def draw_anchors(levels: list[LevelSpec], canvas: Image.Image, offset: float = 0.0) -> Image.Image:
    """Anchor centres of every level as dots over ``canvas`` and each level's shapes at the centre cell
    nearest the middle, one colour per level."""
    picture = canvas.convert("RGB").copy()
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    for number, level in enumerate(levels):
        colour = _LEVEL_COLOURS[number % len(_LEVEL_COLOURS)]
        stride = float(level.stride)
        cols, rows = int(width // stride) + 1, int(height // stride) + 1
        dot = max(1, int(stride // 8))
        for y in range(rows):
            for x in range(cols):
                cx, cy = (x + offset) * stride, (y + offset) * stride
                draw.ellipse((cx - dot / 2, cy - dot / 2, cx + dot / 2, cy + dot / 2), fill=colour)
        shapes = torch.tensor(level.anchors, dtype=torch.float32)
        centre_x = round(width / 2 / stride - offset) * stride
        centre_y = round(height / 2 / stride - offset) * stride
        placed = grid_anchors(shapes, 1.0, 1, 1, 0.0) + torch.tensor([centre_x, centre_y, centre_x, centre_y])
        for box in placed.tolist():
            draw.rectangle(box, outline=colour, width=2)
    legend = ", ".join(f"stride {level.stride}: {len(level.anchors)} anchors" for level in levels)
    _caption(draw, legend, width)
    return picture
