"""`rpn export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import RpnError, UsageError
from .base import (
    app,
    checkpoint_or_default,
    err,
    fail,
    interruptible,
)


@app.command()
@interruptible
def export(
    paths: Annotated[list[Path], typer.Argument(help="[CHECKPOINT] DESTINATION: a .safetensors checkpoint of ours (default: the shipped one) and the file to write (.onnx, or .pt for TorchScript).", metavar="[CHECKPOINT] DESTINATION")],
    export_format: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript (deprecated by PyTorch; loading it back runs code, so rpn needs --trust-torchscript for it).")] = "onnx",
) -> None:
    """Export the network (backbone and head; dynamic image size) for deployment tools.

    The file keeps the model description in its metadata, so `rpn propose --checkpoint FILE` runs it
    with the same proposal layer.
    """
    from ..inference.export import export_model

    try:
        if len(paths) > 2:
            raise UsageError("rpn export [CHECKPOINT] DESTINATION: at most two paths")
        checkpoint, destination = (None, paths[0]) if len(paths) == 1 else paths
        export_model(checkpoint_or_default(checkpoint), destination, export_format)
    except RpnError as error:
        fail(error)
    err.print(f"wrote {destination} ({export_format})", markup=False, highlight=False)
