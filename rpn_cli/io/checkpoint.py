"""Our checkpoint format: one ``.safetensors`` file, the model description as JSON in its metadata.

Also the import of the seed project's plain ``.pth`` state dicts.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..model.network import RegionProposalNetwork
from ..model.spec import ModelSpec
from .files import atomic_write_bytes

METADATA_KEY = "rpn_cli.model"


def save_checkpoint(model: RegionProposalNetwork, path: str | Path, spec: ModelSpec | None = None) -> None:
    """Write ``model``'s weights and description (``spec`` or the model's own) to ``path``."""
    spec = spec or model.spec
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True)}
    atomic_write_bytes(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_spec(path: str | Path) -> ModelSpec:
    """The model description of a checkpoint, without loading its weights."""
    path = Path(path)
    _check_exists(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable .safetensors checkpoint ({_first_line(error)})"
                              f"{_what_it_is_instead(path)}") from error
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: a safetensors file without an rpn model description")
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: model description is not valid JSON ({error})") from error
    return ModelSpec.from_dict(data, source=str(path))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> RegionProposalNetwork:
    """Rebuild the model a checkpoint describes and load its weights, in eval mode on ``device``."""
    path = Path(path)
    spec = read_spec(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot read weights ({_first_line(error)})") from error
    model = RegionProposalNetwork(spec)
    load_state_strict(model, tensors, str(path))
    return model.to(device).eval()


def load_state_strict(model: torch.nn.Module, tensors: dict, source: str,
                      name_in_source: Callable[[str], str] = lambda key: key) -> None:
    """Load ``tensors`` into ``model``; a missing, unexpected or mis-shaped key is a one-line error naming it
    as the source file spells it (``name_in_source`` maps our key to that name)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {name_in_source(missing[0])}{more}")
    unexpected = [key for key in tensors if key not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {name_in_source(unexpected[0])}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: key {name_in_source(key)} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    model.load_state_dict(tensors)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint")


def _what_it_is_instead(path: Path) -> str:
    """A hint for the files users most often give in place of a checkpoint of ours."""
    if path.suffix == ".onnx":
        return "; an ONNX export runs with rpn propose or rpn eval --checkpoint, not here"
    if zipfile.is_zipfile(path):
        return "; a PyTorch file: rpn convert imports a Faster R-CNN state dict into a checkpoint"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_plain_torch_file(path: Path, what: str):
    """A ``torch.save`` file read as tensors and plain containers only (``weights_only``): pickled
    objects and TorchScript archives (which carry code) are refused, never run. ``what`` names the
    expected content in the error."""
    _check_exists(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist()):
                raise CheckpointError(f"{path}: a TorchScript archive, not a {what}; rpn does not load TorchScript here "
                                      "(it runs code on loading)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: our one line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
        # torch's own message advises weights_only=False, which would run the file's code: not repeated.
        raise CheckpointError(f"{path}: not a readable {what}: it is not a PyTorch file, or it holds Python objects "
                              "beyond tensors and plain containers, which rpn does not load") from error


def read_torch_state_dict(path: Path) -> dict:
    """A ``.pth`` state dict, read without unpickling arbitrary objects."""
    state = load_plain_torch_file(path, "PyTorch state dict")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


