"""`rpn export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    export_format: Annotated[str, typer.Option("--format", "-f", help="onnx, onnx-int8 (quantized for CPUs, calibrated on --calibration photos) or torchscript (deprecated by PyTorch; loading it back runs code, so rpn needs --trust-torchscript for it).")] = "onnx",
    calibration: Annotated[Optional[list[str]], typer.Option("--calibration", help="onnx-int8: photos like those the model will see (files, folders, globs; repeatable), never your validation photos.")] = None,
    calibration_count: Annotated[Optional[int], typer.Option("--calibration-count", min=1, help="onnx-int8: at most this many of them, in the order given.  [default: 200]")] = None,
    calibration_method: Annotated[Optional[str], typer.Option("--calibration-method", help="onnx-int8: how activation ranges are set: percentile (each tensor's --calibration-percentile of magnitude) or minmax (the whole range seen); which loses less recall depends on the weights (rpn_cli/weights/README.md).  [default: percentile]")] = None,
    calibration_percentile: Annotated[Optional[float], typer.Option("--calibration-percentile", help="onnx-int8 with percentile: the percentile of magnitude each activation range ends at.  [default: 99.99]")] = None,
    weight_rounding: Annotated[Optional[str], typer.Option("--weight-rounding", help="onnx-int8: how weights are rounded to int8: gptq (each convolution's rounding chosen so that its outputs on the calibration photos move least; GPTQ) or nearest (each weight to its nearest step, ONNX Runtime's own).  [default: gptq]")] = None,
) -> None:
    """Export the network (backbone and head; dynamic image size) for deployment tools.

    The file keeps the model description in its metadata, so `rpn propose --checkpoint FILE` runs it
    with the same proposal layer.
    """
    from ..inference.export import (
        check_export_destination,
        export_model,
        export_suffixes,
    )
    from ..io.inputs import expand_inputs

    try:
        if len(paths) > 2:
            raise UsageError("rpn export [CHECKPOINT] DESTINATION: at most two paths")
        checkpoint, destination = (None, paths[0]) if len(paths) == 1 else paths
        if checkpoint is None and destination.suffix == ".safetensors":
            raise UsageError(f"{destination}: a checkpoint is what rpn export reads; name the file to write "
                             f"after it: rpn export {destination} model{export_suffixes(export_format)[0]}")
        checkpoint = checkpoint_or_default(checkpoint)
        check_export_destination(checkpoint, destination, export_format)
        # Only the options given reach export_model, whose defaults are the documented ones.
        tuning = {"calibration_count": calibration_count, "calibration_method": calibration_method,
                  "calibration_percentile": calibration_percentile, "weight_rounding": weight_rounding}
        given = ["--" + key.replace("_", "-") for key, value in (("calibration", calibration), *tuning.items())
                 if value is not None]
        if given and export_format != "onnx-int8":
            raise UsageError(f"{', '.join(given)}: only for --format onnx-int8, not {export_format}")
        if calibration_percentile is not None and calibration_method == "minmax":
            raise UsageError("--calibration-percentile: only with --calibration-method percentile")
        photos = []
        for item in expand_inputs(calibration or []):
            if item.problem:
                err.print(f"warning: {item.given}: {item.problem}", markup=False, highlight=False, soft_wrap=True)
            else:
                photos.append(Path(item.given))
        if calibration and not photos:
            raise UsageError("no readable calibration photos")
        used = export_model(checkpoint, destination, export_format, calibration=photos,
                            on_skipped=_warn_skipped, **{key: value for key, value in tuning.items() if value is not None})
    except RpnError as error:
        fail(error)
    calibrated = f", calibrated on {used} photos" if used else ""
    err.print(f"wrote {destination} ({export_format}{calibrated})", markup=False, highlight=False, soft_wrap=True)


def _warn_skipped(path: Path, problem: str) -> None:
    err.print(f"warning: skipped: {problem}", markup=False, highlight=False, soft_wrap=True)
