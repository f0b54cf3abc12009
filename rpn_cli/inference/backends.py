"""Which engine runs the network: PyTorch, or ONNX Runtime on an ONNX export built once and cached.

Measured (benchmarks/benchmark_propose.py, README "Performance"): on the CPU the int8 model is the
fastest, then (for a checkpoint without one) PyTorch in bfloat16 where the CPU has it natively, else
ONNX Runtime in float32. ``auto`` follows that. An int8 model is made and calibrated beforehand
(``rpn export --format onnx-int8``); the shipped checkpoint ships with its own.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..errors import UsageError
from ..io.files import file_sha256
from ..weights import DEFAULT_CHECKPOINT, DEFAULT_INT8

BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-int8")
# Exported files are told apart from our .safetensors checkpoints, and from each other, by suffix.
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".torchscript", ".ts")
EXPORTED_SUFFIXES = ONNX_SUFFIXES + TORCHSCRIPT_SUFFIXES


def onnxruntime_available() -> bool:
    """ONNX Runtime to run, onnx and onnxscript to export (the ``onnx`` extra)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def onnxruntime_installed() -> bool:
    """ONNX Runtime alone: enough to run an int8 model made beforehand."""
    return importlib.util.find_spec("onnxruntime") is not None


def cpu_has_bfloat16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_backend(name: str, device: torch.device, precision: str, checkpoint: Path) -> str:
    """``torch``, ``onnxruntime`` or ``onnxruntime-int8`` for ``--backend NAME``. ``auto`` on a CPU, with
    ``--precision auto``: int8 when the checkpoint has one (:func:`int8_model_for`); else, for float32, ONNX
    Runtime on a CPU without native bfloat16 when the ``onnx`` extra is installed; else PyTorch.
    Exported files run on what they are, as they were exported: another backend or precision asked of one
    is refused."""
    if name not in BACKENDS:
        raise UsageError(f"--backend {name}: choose from {', '.join(BACKENDS)}")
    exported = checkpoint.suffix in EXPORTED_SUFFIXES
    if exported:
        runs_in, engine = ("onnxruntime", "ONNX Runtime") if checkpoint.suffix in ONNX_SUFFIXES else ("torch", "PyTorch")
        if name not in ("auto", runs_in, "onnxruntime-int8"):  # int8's own refusal, below, says more
            raise UsageError(f"{checkpoint}: an exported file runs in {engine}, not --backend {name}")
        if precision not in ("auto", "float32"):
            raise UsageError(f"{checkpoint}: an exported file runs as it was exported, not in --precision {precision}")
    if name in ("onnxruntime", "onnxruntime-int8"):
        if precision not in ("auto", "float32"):
            raise UsageError(f"--backend {name} runs {'int8' if name.endswith('int8') else 'float32'}, "
                             f"not --precision {precision}")
        if name == "onnxruntime-int8":
            if exported:
                raise UsageError(f"--backend {name} is for our .safetensors checkpoints; an exported file runs as it is")
            if device.type != "cpu":
                raise UsageError(f"--backend {name} runs on the CPU, not --device {device.type}")
            if not onnxruntime_installed():
                raise UsageError(f"--backend {name} needs onnxruntime: pip install onnxruntime")
        elif not exported and not onnxruntime_available():
            raise UsageError(f'--backend {name} needs the onnx extra: pip install "rpn-cli[onnx]"')
        return name
    if exported:
        return runs_in
    if name == "torch":
        return "torch"
    if device.type == "cpu" and precision == "auto" and int8_model_for(checkpoint) is not None:
        return "onnxruntime-int8"
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
    digest = file_sha256(checkpoint)[:16]
    return cache_dir() / "onnx" / f"{digest}-torch{torch.__version__.split('+')[0]}.onnx"


def int8_model_for(checkpoint: Path) -> Path | None:
    """The shipped int8 model when ``checkpoint`` holds the shipped checkpoint's bytes (a test checks
    that the int8 file was made from them), and ONNX Runtime is installed; else None."""
    if not (DEFAULT_INT8.is_file() and DEFAULT_CHECKPOINT.is_file() and onnxruntime_installed()):
        return None
    checkpoint = Path(checkpoint)
    # The shipped path itself (the usual case) needs no hashing; another file only when the sizes agree.
    same = checkpoint.resolve() == DEFAULT_CHECKPOINT or (
        checkpoint.is_file() and checkpoint.stat().st_size == DEFAULT_CHECKPOINT.stat().st_size
        and file_sha256(checkpoint) == file_sha256(DEFAULT_CHECKPOINT))
    return DEFAULT_INT8 if same else None
