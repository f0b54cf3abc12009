"""Exporting the network (backbone and head) to ONNX or TorchScript, and running exported files.

The proposal layer stays in Python: an exported file holds the network and,
in its metadata, the same model description as our ``.safetensors`` format,
so ``rpn propose --checkpoint model.onnx`` gives the same proposals.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, RpnError, UsageError
from ..io.checkpoint import METADATA_KEY, load_checkpoint, read_spec
from ..model.folding import fold_batchnorm
from ..model.network import LevelOutput, flatten_outputs
from ..model.spec import ModelSpec
from .backends import (
    EXPORTED_SUFFIXES,
    ONNX_SUFFIXES,
    int8_model_for,
    onnx_cache_path,
    resolve_backend,
)
from .devices import PRECISION_DTYPES, resolve_precision
from .export import export_model
from .quantize import QUANTIZATION_KEY


class ExportedRegionProposalNetwork:
    """An exported network run by ONNX Runtime or TorchScript, used where a
    :class:`RegionProposalNetwork` is (``spec``, ``device``, ``channels_last``, calling it)."""

    channels_last = False
    precision, dtype = "float32", torch.float32  # exported files run as they were exported

    def __init__(self, path: str | Path, device: torch.device, *, trust_torchscript: bool = False):
        self.path = Path(path)
        self._sessions_by_threads: dict[int, list[ExportedRegionProposalNetwork]] = {}
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such checkpoint")
        self.device = device
        if self.path.suffix in ONNX_SUFFIXES:
            self._load_onnx()
        elif trust_torchscript:
            self._load_torchscript()
        else:
            raise CheckpointError(f"{self.path}: a TorchScript file runs code it carries when it is loaded; "
                                  "load it only if you trust its source (--trust-torchscript), "
                                  "or use our .safetensors or an .onnx export")

    def _load_onnx(self) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise UsageError('running an .onnx checkpoint needs onnxruntime: pip install "rpn-cli[onnx]"') from error
        self.providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            self.providers.insert(0, "CUDAExecutionProvider")
        self.session = self._onnx_session(onnxruntime)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.spec = self._spec_from(metadata.get(METADATA_KEY))
        if QUANTIZATION_KEY in metadata:
            self.precision = "int8"
        self.device = torch.device("cpu")  # ONNX Runtime hands back host arrays

    def _onnx_session(self, onnxruntime, threads: int = 0):
        """An ONNX Runtime session of the file on ``threads`` threads (the calling one included; 0: ONNX
        Runtime's default, one a core)."""
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # ONNX Runtime's threads spin after each run by default, taking the cores from the proposal
        # layer that runs next in PyTorch (measured: 20 ms instead of 10 ms an image on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return onnxruntime.InferenceSession(str(self.path), options, providers=self.providers)
        except Exception as error:  # onnxruntime has its own exception types
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from error

    @property
    def runs_on_cpu(self) -> bool:
        """Whether the network runs on the CPU (ONNX Runtime hands back host arrays even from a GPU)."""
        if hasattr(self, "session"):
            return "CUDAExecutionProvider" not in self.session.get_providers()
        return self.device.type == "cpu"

    def with_threads(self, threads: int, count: int) -> list[ExportedRegionProposalNetwork] | None:
        """``count`` copies of this network, each on an ONNX Runtime session of its own that runs on
        ``threads`` threads (the calling one included), built on first use and then kept: for several
        images at once, each on its own share of the cores (:func:`rpn_cli.inference.engine.propose_images`'s
        ``lanes``). None for TorchScript, which runs on PyTorch's threads."""
        if not hasattr(self, "session"):
            return None
        import onnxruntime

        built = self._sessions_by_threads.setdefault(threads, [])
        while len(built) < count:
            twin = copy.copy(self)
            twin.session = self._onnx_session(onnxruntime, threads)
            twin._sessions_by_threads = {}
            built.append(twin)
        return built[:count]

    def _load_torchscript(self) -> None:
        files = {METADATA_KEY: ""}
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the CLI's help says it
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=files)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{self.path}: not a loadable TorchScript file ({str(error).splitlines()[0]})") from error
        self.spec = self._spec_from(files[METADATA_KEY] or None)

    def _spec_from(self, text: str | None) -> ModelSpec:
        if not text:
            raise CheckpointError(f"{self.path}: exported without an rpn model description")
        return ModelSpec.from_dict(json.loads(text), source=str(self.path))

    def raw_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self, "session"):
            arrays = self.session.run(None, {"images": images.cpu().numpy()})
            return [torch.from_numpy(array) for array in arrays]
        return list(self.module(images.to(self.device)))

    def __call__(self, images: torch.Tensor) -> list[LevelOutput]:
        return flatten_outputs(self.spec, self.raw_outputs(images), tuple(images.shape[2:]))


def load_model(path: str | Path, device: torch.device | str = "cpu", precision: str = "float32", *,
               trust_torchscript: bool = False, backend: str | None = None):
    """Our ``.safetensors`` checkpoint, or an exported ``.onnx`` / TorchScript file, ready to propose.

    ``precision`` (see :func:`rpn_cli.devices.resolve_precision`) applies to our checkpoints;
    exported files run as they were exported (float32, or int8). ``backend`` (:mod:`rpn_cli.backends`):
    ``torch``, ``onnxruntime`` (our checkpoint's ONNX export, built once into the cache folder) or
    ``auto``; None: PyTorch for our checkpoints, an exported file's own engine for it (another one asked
    of an exported file is refused). TorchScript files (by suffix) can run code on loading: they are refused unless
    ``trust_torchscript``; safetensors and ONNX files carry no code.
    """
    path = Path(path)
    device = torch.device(device)
    is_exported = path.suffix in EXPORTED_SUFFIXES
    chosen = resolve_backend(backend or ("auto" if is_exported else "torch"), device, precision, path)
    if is_exported:
        return ExportedRegionProposalNetwork(path, device, trust_torchscript=trust_torchscript)
    if chosen == "onnxruntime-int8":
        read_spec(path)
        int8 = int8_model_for(path)
        if int8 is None:
            raise UsageError(f"{path}: no int8 model was made from it; make one with rpn export {path} "
                             f"{path.stem}.int8.onnx --format onnx-int8 --calibration PHOTOS, then pass that file "
                             "with --checkpoint")
        return ExportedRegionProposalNetwork(int8, device)
    if chosen == "onnxruntime":
        read_spec(path)  # a checkpoint of ours, checked before it is hashed and exported
        try:
            exported = onnx_cache_path(path)
            if not exported.is_file():  # built once (tens of seconds), then reused
                export_model(path, exported, "onnx")
            return ExportedRegionProposalNetwork(exported, device)
        except Exception as error:  # an unwritable cache, an exporter failure: PyTorch still runs it
            if backend != "auto":
                raise error if isinstance(error, RpnError) else CheckpointError(
                    f"{path}: the ONNX Runtime backend could not be built ({str(error).splitlines()[0]})") from error
    model = load_checkpoint(path, device)
    dtype = PRECISION_DTYPES[resolve_precision(precision, device)]
    if dtype != torch.float32 or getattr(model.backbone, "fold_in_float32", True):
        # Measured: the default network 25-30% faster on this CPU, same outputs to 1e-5. In reduced
        # precision no normalisation layer is left to run in it.
        fold_batchnorm(model)
    # Weights converted once rather than autocast: autocast re-casts every weight on every call
    # (measured: 39.4 -> 37.8 ms a 512x704 image in bfloat16, identical outputs).
    return model.to(dtype=dtype)
