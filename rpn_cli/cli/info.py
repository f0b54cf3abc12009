"""`rpn info`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import RpnError
from .base import (
    app,
    checkpoint_or_default,
    fail,
)


@app.command()
def info(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors checkpoint of ours.  [default: the shipped one]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON only.")] = False,
) -> None:
    """Print a checkpoint's model description and parameter count."""
    from ..io.checkpoint import load_checkpoint
    from ..model.network import parameter_count

    try:
        checkpoint = checkpoint_or_default(checkpoint)
        model = load_checkpoint(checkpoint, "cpu")
    except RpnError as error:
        fail(error)
    description = model.spec.to_dict()
    description["parameters"] = parameter_count(model)
    if as_json:
        typer.echo(json.dumps(description, indent=2))
        return
    spec = model.spec
    console = Console(highlight=False)
    console.print(f"checkpoint   {checkpoint}")
    console.print(f"backbone     {json.dumps(description['backbone'])}")
    console.print(f"parameters   {description['parameters']:,}")
    convs = "convolution" if spec.head.conv_depth == 1 else "convolutions"
    console.print(f"head         {spec.head.conv_depth} 3x3 {convs} of {spec.head.mid_channels} channels, "
                  "then the outputs")
    console.print(f"score        {spec.score}")
    for number, level in enumerate(spec.levels):
        console.print(f"level {number}      stride {level.stride}, {len(level.anchors)} anchors")
    console.print(f"preprocess   {json.dumps(description['preprocess'])}")
    console.print(f"proposals    {json.dumps(description['proposals'])}")
    for number, (key, value) in enumerate(spec.provenance.items()):
        label = "provenance" if number == 0 else ""
        console.print(f"{label:<12} {key}: {_summary(value)}", soft_wrap=True, markup=False)
    if spec.provenance:
        console.print(f"{'':<12} (rpn info --json prints all of it)", markup=False)


def _summary(value) -> str:
    """One readable line for a provenance entry: text and numbers whole, figures rounded, long lists and
    nested records counted (a trained checkpoint's history runs to thousands of characters)."""
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    if isinstance(value, dict) and isinstance(value.get("change"), str):  # a change made after training
        return f"{value['change']} ({len(value)} entries)"
    text = json.dumps(value)
    if isinstance(value, str) or len(text) <= 100:
        return value if isinstance(value, str) else text
    return f"{len(value)} {'items' if isinstance(value, list) else 'entries'}"
