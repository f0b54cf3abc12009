"""Exporting the network to ONNX or TorchScript."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import UsageError
from ..io.checkpoint import METADATA_KEY, load_checkpoint, save_checkpoint
from ..io.files import atomic_write_bytes, check_destination
from ..model.network import RegionProposalNetwork
from ..model.spec import ModelSpec
from .backends import ONNX_SUFFIXES, TORCHSCRIPT_SUFFIXES
from .quantize import (
    DEFAULT_PERCENTILE,
    check_calibration_method,
    model_input,
    quantize_onnx,
    readable_photos,
)
from .weight_rounding import WEIGHT_ROUNDINGS, round_weights_gptq

EXPORT_FORMATS = ("onnx", "onnx-int8", "torchscript")


class _RawOutputs(torch.nn.Module):
    """The network with a flat tuple of outputs, as exporters want it."""

    def __init__(self, model: RegionProposalNetwork):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        return tuple(self.model.raw_outputs(images))


def _output_names(spec: ModelSpec) -> list[str]:
    names = []
    for index in range(len(spec.levels)):
        names.extend((f"objectness_{index}", f"deltas_{index}"))
    return names


def _example_input(spec: ModelSpec) -> torch.Tensor:
    size = int(spec.preprocess.size)
    return torch.zeros(1, 3, size, size + size // 3)


def export_suffixes(export_format: str) -> tuple[str, ...]:
    """The suffixes a file of ``export_format`` may have: rpn tells exported files apart by them."""
    if export_format not in EXPORT_FORMATS:
        raise UsageError(f"--format {export_format}: choose from {', '.join(EXPORT_FORMATS)}")
    return TORCHSCRIPT_SUFFIXES if export_format == "torchscript" else ONNX_SUFFIXES


def check_weight_rounding(weight_rounding: str) -> None:
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise UsageError(f"--weight-rounding {weight_rounding}: choose from {', '.join(WEIGHT_ROUNDINGS)}")


def check_export_destination(checkpoint: str | Path, destination: str | Path, export_format: str) -> None:
    """Refuse, before any work, a ``destination`` rpn could not read back or that is ``checkpoint``."""
    what = "a TorchScript export" if export_format == "torchscript" else f"an {export_format} export"
    check_destination(Path(destination), export_suffixes(export_format), what, [Path(checkpoint)])


def export_model(checkpoint: str | Path, destination: str | Path, export_format: str, *,
                 calibration: Sequence[Path] = (), calibration_count: int = 200,
                 calibration_method: str = "percentile", calibration_percentile: float = DEFAULT_PERCENTILE,
                 weight_rounding: str = "gptq",
                 on_skipped: Callable[[Path, str], None] = lambda path, problem: None) -> int:
    """Write the checkpoint's network to ONNX (dynamic batch and image size), int8 ONNX or TorchScript.
    int8: calibrated on up to ``calibration_count`` readable ``calibration`` photos (the others are passed
    to ``on_skipped``): activation ranges by ``calibration_method`` (see :mod:`.quantize`), and weights
    rounded by ``weight_rounding``, ``gptq`` (for the convolutions' inputs on those photos, see
    :mod:`.weight_rounding`) or ``nearest``.
    Returns the number of calibration photos used (0 for the float formats)."""
    check_export_destination(checkpoint, destination, export_format)
    if export_format == "onnx-int8":
        if not calibration:
            raise UsageError("--format onnx-int8 needs --calibration: a few hundred photos like those it will see")
        check_calibration_method(calibration_method, calibration_percentile)
        check_weight_rounding(weight_rounding)
        _require_onnx_extra()
        photos = readable_photos(calibration, calibration_count, on_skipped)
        if not photos:
            raise UsageError("no readable calibration photos")
        with tempfile.TemporaryDirectory(prefix="rpn-export-") as work:
            exported = Path(checkpoint)
            if weight_rounding == "gptq":
                model = load_checkpoint(checkpoint, "cpu").eval()
                round_weights_gptq(model, (torch.from_numpy(model_input(path, model.spec)["images"])
                                           for path in photos))
                exported = Path(work) / "gptq.safetensors"
                save_checkpoint(model, exported)
                del model
            fp32 = Path(work) / "fp32.onnx"
            export_model(exported, fp32, "onnx")
            return quantize_onnx(fp32, destination, photos, method=calibration_method,
                                 percentile=calibration_percentile, weight_rounding=weight_rounding,
                                 source=Path(checkpoint))
    model = load_checkpoint(checkpoint, "cpu")
    wrapper = _RawOutputs(model).eval()
    example = _example_input(model.spec)
    description = json.dumps(model.spec.to_dict(), sort_keys=True)
    destination = Path(destination)
    if export_format == "onnx":
        _export_onnx(wrapper, model.spec, example, description, destination)
    else:
        with torch.no_grad(), warnings.catch_warnings():  # PyTorch's deprecation notice: our help says it
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            atomic_write_bytes(destination,
                               lambda tmp: torch.jit.save(traced, tmp, _extra_files={METADATA_KEY: description}))
    return 0


def _require_onnx_extra() -> None:
    """Refuse an int8 export before its minutes of calibration where the onnx extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UsageError('int8 export needs the onnx extra: pip install "rpn-cli[onnx]"') from error


def _export_onnx(wrapper, spec: ModelSpec, example, description: str, destination: Path) -> None:
    try:
        import onnx
    except ImportError as error:
        raise UsageError('ONNX export needs the onnx extra: pip install "rpn-cli[onnx]"') from error
    batch, height, width = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC

    def write(tmp: str) -> None:
        with torch.no_grad(), _quiet_logger("torch.fx.experimental.symbolic_shapes"):
            program = torch.onnx.export(
                wrapper, (example,), input_names=["images"], output_names=_output_names(spec),
                dynamic_shapes={"images": {0: batch, 2: height, 3: width}}, dynamo=True, verbose=False,
            )
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, description
        onnx.save(proto, tmp)

    atomic_write_bytes(destination, write)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """PyTorch's shape solver logs, as warnings with tracebacks, inequalities about the dynamic image size
    it cannot simplify (seen with the resnet50-c4 trunk); the export is right all the same, and a library
    stays quiet."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
