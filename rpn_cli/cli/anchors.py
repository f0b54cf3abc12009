"""`rpn anchors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import RpnError, UsageError
from .base import (
    app,
    err,
    fail,
    parse_floats,
)


@app.command()
def anchors(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Show this checkpoint's anchors (else --ratios/--scales/--stride).")] = None,
    ratios: Annotated[Optional[str], typer.Option(help="Height/width ratios, comma-separated (not with --checkpoint).  [default: 0.5,1,2]")] = None,
    scales: Annotated[Optional[str], typer.Option(help="Scales of the base size, comma-separated (not with --checkpoint).  [default: 8,16,32]")] = None,
    stride: Annotated[Optional[int], typer.Option(min=1, help="Feature stride, also the base size (not with --checkpoint).  [default: 16]")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Draw the anchor grid over this image (resized as the checkpoint would) in the --out PNG.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a PNG of the anchors here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """Print the anchor table (width, height, ratio of each anchor) and draw the anchors."""
    import torch
    from PIL import Image
    from rich.table import Table

    from ..io.checkpoint import read_spec
    from ..io.files import check_writable_under
    from ..io.images import load_image
    from ..io.outputs import save_png
    from ..io.visualize import draw_anchors
    from ..model.anchors import anchor_shapes, describe_anchor_shapes
    from ..model.preprocess import resize_image
    from ..model.spec import LevelSpec

    try:
        if image is not None and out is None:
            raise UsageError("--image: the grid is drawn over it in a PNG; name that file with --out")
        if out is not None:
            check_writable_under(out)
        if checkpoint is not None:
            given = [name for name, value in (("--ratios", ratios), ("--scales", scales), ("--stride", stride))
                     if value is not None]
            if given:
                raise UsageError(f"{', '.join(given)}: not with --checkpoint, whose anchors are shown")
            spec = read_spec(checkpoint)
            levels, offset, preprocess = spec.levels, spec.anchor_offset, spec.preprocess
        else:
            ratios = "0.5,1,2" if ratios is None else ratios
            scales = "8,16,32" if scales is None else scales
            stride = 16 if stride is None else stride
            ratio_values, scale_values = parse_floats(ratios, "--ratios"), parse_floats(scales, "--scales")
            shapes = anchor_shapes(stride, ratio_values, scale_values)
            if not torch.isfinite(shapes).all() or (shapes[:, 2:] - shapes[:, :2]).min() <= 0:
                raise UsageError(f"--stride {stride} --ratios {ratios} --scales {scales}: anchors too large or "
                                 "too thin to represent")
            levels, offset, preprocess = [LevelSpec(stride, shapes.tolist())], 0.0, None
        # The image is read before anything is printed: a run that fails prints no table.
        canvas = load_image(image) if image is not None else Image.new("RGB", (800, 600), (40, 40, 40))
        if image is not None and preprocess is not None:
            canvas = resize_image(canvas, preprocess)
        rows = []
        for number, level in enumerate(levels):
            for row in describe_anchor_shapes(torch.tensor(level.anchors)):
                rows.append({"level": number, "stride": level.stride, **row})
        if as_json:
            typer.echo(json.dumps(rows))
        else:
            table = Table("level", "stride", "anchor", "width", "height", "h/w", "x1, y1, x2, y2")
            for row in rows:
                table.add_row(str(row["level"]), str(row["stride"]), str(row["index"]), f"{row['width']:.1f}",
                              f"{row['height']:.1f}", f"{row['ratio']:.2f}", ", ".join(f"{v:.2f}" for v in row["box"]))
            Console(highlight=False).print(table)
        if out is not None:
            save_png(draw_anchors(levels, canvas, offset), out)
            err.print(f"wrote {out}", markup=False, highlight=False)
    except RpnError as error:
        fail(error)
