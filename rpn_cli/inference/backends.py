"""Which engine runs the network: PyTorch, or ONNX Runtime on an ONNX export built once and cached.

Measured (benchmarks/benchmark_propose.py): on CPUs with native bfloat16 PyTorch in bfloat16 is the
fastest; without it ONNX Runtime's float32 beats PyTorch's float32. ``auto`` follows that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from ..errors import UsageError

BACKENDS = ("auto", "torch", "onnxruntime")
EXPORTED_SUFFIXES = (".onnx", ".pt", ".torchscript", ".ts")


def onnxruntime_available() -> bool:
    """ONNX Runtime to run, onnx and onnxscript to export (the ``onnx`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def cpu_has_bfloat16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_backend(name: str, device: torch.device, precision: str, checkpoint: Path) -> str:
    """``torch`` or ``onnxruntime`` for ``--backend NAME``. ``auto``: ONNX Runtime on a CPU without native
    bfloat16, for our own checkpoints in float32, when the ``onnx`` extra is installed; else PyTorch.
    Exported files run on what they are."""
    if name not in BACKENDS:
        raise UsageError(f"--backend {name}: choose from {', '.join(BACKENDS)}")
    exported = checkpoint.suffix in EXPORTED_SUFFIXES
    if name == "onnxruntime":
        if precision not in ("auto", "float32"):
            raise UsageError(f"--backend onnxruntime runs float32, not --precision {precision}")
        if not exported and not onnxruntime_available():
            raise UsageError('--backend onnxruntime needs the onnx extra: pip install "rpn-cli[onnx]"')
        return name
    if name == "torch" or exported:
        return "torch"
    if device.type == "cpu" and precision in ("auto", "float32") and not cpu_has_bfloat16() and onnxruntime_available():
        return "onnxruntime"
    return "torch"


def cache_dir() -> Path:
    """Where built files go: ``$RPN_CACHE_DIR``, else ``$XDG_CACHE_HOME/rpn-cli``, else ``~/.cache/rpn-cli``."""
    if os.environ.get("RPN_CACHE_DIR"):
        return Path(os.environ["RPN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rpn-cli"


def onnx_cache_path(checkpoint: Path) -> Path:
    """The cached ONNX export of ``checkpoint``: named by the file's content and the torch that exported it."""
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{digest}-torch{torch.__version__.split('+')[0]}.onnx"

