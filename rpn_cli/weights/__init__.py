"""The shipped default checkpoint, installed with the package (package data): see README.md here."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "rpn_mobilenet_v2_fpn.safetensors"
# Its int8 ONNX model (rpn export --format onnx-int8), for --backend onnxruntime-int8.
DEFAULT_INT8 = Path(__file__).resolve().parent / "rpn_mobilenet_v2_fpn.int8.onnx"
