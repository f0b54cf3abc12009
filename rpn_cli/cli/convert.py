"""`rpn convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RpnError, UsageError
from .base import (
    app,
    err,
    fail,
)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A state dict (.pth) in the source layout.")],
    destination: Annotated[Path, typer.Argument(help="Where to write our .safetensors checkpoint.")],
    source_format: Annotated[str, typer.Option("--from", help="The layout of SOURCE: seed-project or torchvision.")] = "seed-project",
    arch: Annotated[Optional[str], typer.Option("--arch", help="With --from torchvision: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn or fasterrcnn_mobilenet_v3_large_320_fpn.")] = None,
) -> None:
    """Import another project's checkpoint (a state dict, read without unpickling objects) into our format."""
    from ..io.converters import convert_seed_project, convert_torchvision

    try:
        if source_format == "seed-project":
            spec = convert_seed_project(source, destination)
        elif source_format == "torchvision":
            if arch is None:
                raise UsageError("--from torchvision needs --arch")
            spec = convert_torchvision(source, destination, arch)
        else:
            raise UsageError(f"--from {source_format}: supported: seed-project, torchvision")
    except RpnError as error:
        fail(error)
    err.print(f"wrote {destination} ({spec.backbone.name}, {spec.score} scores)", markup=False, highlight=False)
