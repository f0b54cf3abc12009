"""The one place that decides which device the model runs on, and what runs beside it."""

import math
import os

import torch

from ..errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` to a torch device; ``auto`` takes CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        return torch.device(name)
    raise UsageError(f"--device {name}: expected one of {', '.join(DEVICE_CHOICES)}")


PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_precision(name: str, device: torch.device) -> str:
    """The network's precision: ``auto`` is bfloat16 on CPUs with native bfloat16 (AVX512-BF16/AMX),
    float16 on CUDA, float32 elsewhere. Decoding and NMS always run in float32."""
    if name not in PRECISION_CHOICES:
        raise UsageError(f"--precision {name}: expected one of {', '.join(PRECISION_CHOICES)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


PRECISION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_decode_workers(device: torch.device) -> int:
    """Threads decoding images beside the model: the cores the network leaves free.

    On a CPU the network's own threads take every core, and decoding threads beside them
    only contend (measured on 2 cores: 81 ms an image with 2 threads, 62 ms with none,
    ``benchmarks/benchmark_propose.py``); on CUDA the host cores are free to decode.
    """
    cores = cpu_cores()
    if device.type == "cuda":
        return min(4, cores)
    return min(4, max(0, cores - torch.get_num_threads()))


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Each running lane holds one image (decoded, resized, through the network) at a time: this bounds memory.
MAX_DEFAULT_LANES = 8


def default_lanes(model) -> int:
    """Images run at once by default (:func:`rpn_cli.inference.engine.propose_images`): where ONNX Runtime
    runs the network on the CPU, as ``auto`` picks on CPUs, as many as use every core with an equal
    number of threads each, at most ``MAX_DEFAULT_LANES`` (2 cores: 2 lanes of 1; 12: 6 of 2); each lane
    gets a session of its own, so nothing process-wide changes. Else 1: PyTorch networks take lanes
    when asked (``--lanes``), setting PyTorch's process-wide thread count for the run."""
    if getattr(model, "session", None) is None or not model.runs_on_cpu:
        return 1
    cores = cpu_cores()
    return max(1, cores // math.ceil(cores / MAX_DEFAULT_LANES))
