"""The shipped default checkpoint, installed with the package (package data): see README.md here."""

from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "rpn_mobilenet_v2_fpn.safetensors"
