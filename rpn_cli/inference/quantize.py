"""int8 ONNX models: ONNX Runtime static quantization of an ONNX export, calibrated on real photos.

The recipe (measured on 146 validation photos against the float32 export, benchmarks/recall_by_precision.py):
QDQ, int8 weights per channel with 7-bit range (``reduce_range``: CPUs without VNNI saturate 8-bit
products in their int8 kernels), uint8 activations, and the head's two final 1x1 convolutions
(objectness, box deltas) kept in float32. The export rounds the weights before (GPTQ,
:mod:`.weight_rounding`) unless asked for ONNX Runtime's nearest rounding. Activation ranges: by default each tensor's 99.99th percentile
of magnitude (ONNX Runtime's percentile calibrator), which lost 0.0001 / 0.0018 AR@100 / AR@300 against
float32 on the sixth-stage checkpoint where whole min-max ranges lost 0.0034 / 0.0048; the best
percentile moves with the weights (99.999 for the eighth stage: rpn_cli/weights/README.md). The network
runs in about half its float32 time on the CPU measured.

Photos go through the calibrator one at a time (ONNX Runtime's ``CalibStridedMinMax`` with a stride
of 1): its histograms merge photo by photo, so memory stays that of one photo's activations and photos
of different sizes mix (in one pass it holds every photo's activations at once and stacks them).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ImageError, UsageError
from ..io.checkpoint import METADATA_KEY
from ..io.files import atomic_write_bytes, file_sha256
from ..io.images import load_image
from ..model.int8_grid import FLOAT_WEIGHTS
from ..model.preprocess import pad_batch, prepare_image
from ..model.spec import ModelSpec

QUANTIZATION_KEY = "rpn_cli.quantization"
# --calibration-method: ONNX Runtime's CalibrationMethod for each.
CALIBRATION_METHODS = {"percentile": "Percentile", "minmax": "MinMax"}
DEFAULT_PERCENTILE = 99.99


def quantize_onnx(fp32_onnx: str | Path, destination: str | Path, photos: Sequence[Path], *,
                  method: str = "percentile", percentile: float = DEFAULT_PERCENTILE, source: Path | None = None,
                  weight_rounding: str = "nearest") -> int:
    """Write an int8 version of the ONNX export ``fp32_onnx`` (one of ours: the model description in its
    metadata) to ``destination``, its activation ranges taken from ``photos`` (readable ones, as
    :func:`readable_photos` picks them; prepared as ``rpn propose`` prepares them, one at a time at its own
    size) by ``method``: ``percentile`` (each tensor's ``percentile``-th percentile of magnitude) or
    ``minmax``. Returns how many photos calibrated it.
    Deterministic for the same photos in the same order. ``source``: the checkpoint exported, whose
    content hash the file records (:func:`source_digest` reads it back). ``weight_rounding``: how the
    export's weights were put on the int8 grid before (``gptq``) or ONNX Runtime's own (``nearest``), for
    the record."""
    check_calibration_method(method, percentile)
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise UsageError('int8 export needs the onnx extra: pip install "rpn-cli[onnx]"') from error
    metadata = {entry.key: entry.value for entry in onnx.load(str(fp32_onnx)).metadata_props}
    if METADATA_KEY not in metadata:
        raise UsageError(f"{fp32_onnx}: not an rpn ONNX export (no model description)")
    spec = ModelSpec.from_dict(json.loads(metadata[METADATA_KEY]), str(fp32_onnx))
    if not photos:
        raise UsageError("no readable calibration photos")

    class Photos(CalibrationDataReader):
        """The photos in the ranges ONNX Runtime asks for (``CalibStridedMinMax``), read when reached."""

        def __init__(self):
            self.pending = iter(photos)

        def __len__(self):
            return len(photos)

        def set_range(self, start_index: int, end_index: int):
            self.pending = iter(photos[start_index:end_index])

        def get_next(self):
            path = next(self.pending, None)
            return None if path is None else model_input(path, spec)

    with tempfile.TemporaryDirectory(prefix="rpn-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        # The pyramid's dynamic resize defeats symbolic shape inference; ONNX's own suffices.
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        float_nodes = [node.name for node in graph.node
                       if node.op_type == "Conv" and node.input[1].endswith(FLOAT_WEIGHTS)]
        quantized = Path(work) / "int8.onnx"
        # Calibration one photo at a time (a stride of 1): ONNX Runtime's histograms then merge photo by
        # photo. ONNX Runtime's histogram calibrators print their progress; a library stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(prepared), str(quantized), Photos(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                            extra_options={"CalibStridedMinMax": 1, "CalibPercentile": percentile})
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        activations = f"uint8 percentile {percentile:g}" if method == "percentile" else "uint8 MinMax"
        recipe = {"format": "QDQ", "weights": "int8 per channel, reduce_range", "weight_rounding": weight_rounding,
                  "activations": activations,
                  "float_weights": list(FLOAT_WEIGHTS), "calibration_photos": len(photos),
                  "source_sha256": file_sha256(source) if source is not None else None}
        for key, value in ((METADATA_KEY, metadata[METADATA_KEY]), (QUANTIZATION_KEY, json.dumps(recipe))):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        atomic_write_bytes(Path(destination), lambda tmp: onnx.save(model, tmp))
    return len(photos)


def check_calibration_method(method: str, percentile: float = DEFAULT_PERCENTILE) -> None:
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"--calibration-method {method}: choose from {', '.join(CALIBRATION_METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"--calibration-percentile {percentile:g}: choose a value over 50 and at most 100")


def readable_photos(photos: Iterable[Path], count: int, on_skipped) -> list[Path]:
    """The first ``count`` photos that decode; the others are passed to ``on_skipped``."""
    readable: list[Path] = []
    for path in photos:
        if len(readable) == count:
            break
        try:
            load_image(path)
        except ImageError as error:
            on_skipped(path, str(error))
            continue
        readable.append(path)
    return readable


def model_input(path: Path, spec: ModelSpec) -> dict:
    """{"images": (1, 3, H, W) float32 array}: the photo as ``rpn propose`` feeds the network."""
    prepared = prepare_image(load_image(path), spec.preprocess)
    return {"images": pad_batch([prepared.tensor], spec.preprocess.size_divisible).numpy()}


def source_digest(int8_onnx: Path) -> str | None:
    """The content hash of the checkpoint an int8 file of ours was made from, or None."""
    import onnx

    model = onnx.load(str(int8_onnx), load_external_data=False)
    recipe = next((entry.value for entry in model.metadata_props if entry.key == QUANTIZATION_KEY), None)
    return json.loads(recipe).get("source_sha256") if recipe else None
