"""int8 ONNX models: ONNX Runtime static quantization of an ONNX export, calibrated on real photos.

The recipe (measured on 146 validation photos against the float32 export, benchmarks/benchmark_propose.py):
QDQ, int8 weights per channel with 7-bit range (``reduce_range``: CPUs without VNNI saturate 8-bit
products in their int8 kernels), uint8 activations from MinMax ranges, and the head's two final 1x1
convolutions (objectness, box deltas) kept in float32: AR@100/300 within 0.001 of float32, the network
in about half its time on the CPU measured.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ImageError, UsageError
from ..io.checkpoint import METADATA_KEY
from ..io.files import atomic_write_bytes, file_sha256
from ..io.images import load_image
from ..model.preprocess import pad_batch, prepare_image
from ..model.spec import ModelSpec

QUANTIZATION_KEY = "rpn_cli.quantization"
# Quantized heads lose the most recall for the least time: these weights stay float32.
FLOAT_WEIGHTS = ("head.score.weight", "head.loc.weight")


def quantize_onnx(fp32_onnx: str | Path, destination: str | Path, calibration: Iterable[Path], *,
                  count: int = 200, on_skipped=lambda path, problem: None, source: Path | None = None) -> int:
    """Write an int8 version of the ONNX export ``fp32_onnx`` (one of ours: the model description in its
    metadata) to ``destination``, its activation ranges taken from up to ``count`` readable photos of
    ``calibration`` (prepared as ``rpn propose`` prepares them, one at a time at its own size).
    Unreadable photos are passed to ``on_skipped`` and left out. Returns how many photos calibrated it.
    Deterministic for the same photos in the same order. ``source``: the checkpoint exported, whose
    content hash the file records (:func:`source_digest` reads it back)."""
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
    inputs = _model_inputs(calibration, spec, count, on_skipped)  # one photo in memory at a time
    first = next(inputs, None)
    if first is None:
        raise UsageError("no readable calibration photos")

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.stream, self.used = itertools.chain([first], inputs), 0

        def get_next(self):
            item = next(self.stream, None)
            self.used += item is not None
            return item

    photos = Photos()

    with tempfile.TemporaryDirectory(prefix="rpn-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        # The pyramid's dynamic resize defeats symbolic shape inference; ONNX's own suffices.
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        float_nodes = [node.name for node in graph.node
                       if node.op_type == "Conv" and node.input[1].endswith(FLOAT_WEIGHTS)]
        quantized = Path(work) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), photos, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=float_nodes, calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(str(quantized))
        del model.metadata_props[:]
        recipe = {"format": "QDQ", "weights": "int8 per channel, reduce_range", "activations": "uint8 MinMax",
                  "float_weights": list(FLOAT_WEIGHTS), "calibration_photos": photos.used,
                  "source_sha256": file_sha256(source) if source is not None else None}
        for key, value in ((METADATA_KEY, metadata[METADATA_KEY]), (QUANTIZATION_KEY, json.dumps(recipe))):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        atomic_write_bytes(Path(destination), lambda tmp: onnx.save(model, tmp))
    return photos.used


def _model_inputs(photos: Iterable[Path], spec: ModelSpec, count: int, on_skipped) -> Iterator[dict]:
    """{"images": (1, 3, H, W) float32 array} per readable photo, at most ``count``."""
    made = 0
    for path in photos:
        if made == count:
            return
        try:
            prepared = prepare_image(load_image(path), spec.preprocess)
        except ImageError as error:
            on_skipped(path, str(error))
            continue
        made += 1
        yield {"images": pad_batch([prepared.tensor], spec.preprocess.size_divisible).numpy()}


def source_digest(int8_onnx: Path) -> str | None:
    """The content hash of the checkpoint an int8 file of ours was made from, or None."""
    import onnx

    model = onnx.load(str(int8_onnx), load_external_data=False)
    recipe = next((entry.value for entry in model.metadata_props if entry.key == QUANTIZATION_KEY), None)
    return json.loads(recipe).get("source_sha256") if recipe else None
