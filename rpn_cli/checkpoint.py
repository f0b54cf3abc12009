"""Our checkpoint format: one ``.safetensors`` file, the model description as JSON in its metadata.

Also the import of the seed project's plain ``.pth`` state dicts.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, OutputError
from .backbones import TORCHVISION_ARCHS, torchvision_detector
from .model import ModelSpec, RegionProposalNetwork, seed_project_spec

METADATA_KEY = "rpn_cli.model"


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise CheckpointError(f"{path}: not a readable .safetensors checkpoint ({_first_line(error)})") from error
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


def convert_seed_project(source: str | Path, destination: str | Path) -> ModelSpec:
    """Import a seed-project state dict (``extractor.*``, ``rpn.conv1|score|loc.*``) into our format."""
    source = Path(source)
    spec = seed_project_spec()
    spec.provenance = {"converted_from": str(source), "source_format": "seed-project",
                       "note": "anchors in the seed project's transposed x/y order; RGB/255 input, no mean"}
    model = _import_state(spec, read_torch_state_dict(source), source,
                          ("extractor.", "rpn.conv1.", "rpn.score.", "rpn.loc."), _seed_project_key)
    save_checkpoint(model, destination, spec)
    return spec


def _import_state(spec: ModelSpec, state: dict, source: Path, imported_prefixes: tuple[str, ...],
                  name_in_source: Callable[[str], str]) -> RegionProposalNetwork:
    """Our model for ``spec`` holding ``state``, another project's state dict whose names for our
    parameters ``name_in_source`` gives. Its keys under ``imported_prefixes`` are what is imported
    (one no parameter of ours takes is an error); the rest (e.g. a detector's ROI heads) is ignored."""
    model = RegionProposalNetwork(spec)
    ours = {name_in_source(key): key for key in model.state_dict()}
    tensors = {ours.get(key, key): tensor for key, tensor in state.items() if key.startswith(imported_prefixes)}
    _fill_batches_tracked(model, tensors)
    load_state_strict(model, tensors, str(source), name_in_source)
    return model


def _fill_batches_tracked(model: RegionProposalNetwork, tensors: dict) -> None:
    """BatchNorm's ``num_batches_tracked``, unused at inference, is absent from some files (frozen
    BatchNorm, as in torchvision's pretrained detectors, has none): take the model's own."""
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in tensors:
            tensors[key] = value


# torchvision before 0.13 saved the RPN head's conv and the FPN's convs without the ``.0`` of
# Conv2dNormActivation (its hosted COCO weights still do); torchvision renames them on load, as here.
_OLD_TORCHVISION_KEY = re.compile(r"^(rpn\.head\.conv|backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$")


def _current_torchvision_layout(state: dict) -> dict:
    renamed = {}
    for key, value in state.items():
        old = _OLD_TORCHVISION_KEY.match(key)
        if old and old.group(1) == "rpn.head.conv":
            key = f"rpn.head.conv.0.0.{old.group(2)}"
        elif old:
            key = f"{old.group(1)}.0.{old.group(2)}"
        renamed[key] = value
    return renamed


def _seed_project_key(key: str) -> str:
    """Our parameter name as the seed project's state dict spells it."""
    if key.startswith("backbone.body."):
        return "extractor." + key[len("backbone.body."):]
    if key.startswith("head."):
        return "rpn." + key[len("head."):]
    return key


def torchvision_spec(arch: str) -> ModelSpec:
    """Our description of a torchvision Faster R-CNN's RPN, read off the model torchvision builds."""
    detector = torchvision_detector(arch)
    rpn, transform = detector.rpn, detector.transform
    generator = rpn.anchor_generator
    strides = TORCHVISION_ARCHS[arch]
    levels = [
        {"stride": stride, "sizes": list(sizes), "ratios": list(ratios), "anchors": cells.tolist()}
        for stride, sizes, ratios, cells in zip(strides, generator.sizes, generator.aspect_ratios, generator.cell_anchors)
    ]
    return ModelSpec(
        backbone={"name": "torchvision-fpn", "arch": arch},
        levels=levels,
        head={"mid_channels": detector.backbone.out_channels, "conv_depth": len(rpn.head.conv)},
        score="sigmoid",
        anchor_stride="image_over_grid",
        box_weights=list(rpn.box_coder.weights),
        delta_clamp=float(rpn.box_coder.bbox_xform_clip),
        preprocess={
            "resize": "torchvision",
            "size": int(transform.min_size[-1]),
            "max_size": int(transform.max_size),
            "interpolation": "bilinear",
            "size_divisible": int(transform.size_divisible),
            "channel_order": "RGB",
            "scale": 1.0 / 255.0,
            "mean": list(transform.image_mean),
            "std": list(transform.image_std),
        },
        proposals={
            "pre_nms_top_n": int(rpn._pre_nms_top_n["testing"]),
            "post_nms_top_n": int(rpn._post_nms_top_n["testing"]),
            "nms_iou": float(rpn.nms_thresh),
            "min_size": float(rpn.min_size),
            "min_score": float(rpn.score_thresh),
            "nms_per_level": True,
            "top_n_before_filtering": True,
        },
    )


def _torchvision_key(key: str) -> str:
    """Our parameter name as a torchvision detector's state dict spells it (the backbone's are the same;
    torchvision's head convs are ``Conv2dNormActivation``, hence the ``.0``)."""
    if key.startswith("head.conv1."):
        return "rpn.head.conv.0.0." + key[len("head.conv1."):]
    if key.startswith("head.more_convs."):
        index, rest = key[len("head.more_convs."):].split(".", 1)
        return f"rpn.head.conv.{int(index) + 1}.0.{rest}"
    if key.startswith("head.score."):
        return "rpn.head.cls_logits." + key[len("head.score."):]
    if key.startswith("head.loc."):
        return "rpn.head.bbox_pred." + key[len("head.loc."):]
    return key


def convert_torchvision(source: str | Path, destination: str | Path, arch: str) -> ModelSpec:
    """Import a torchvision Faster R-CNN state dict (backbone, FPN and RPN; the ROI heads are ignored)."""
    source = Path(source)
    spec = torchvision_spec(arch)
    spec.provenance = {"converted_from": str(source), "source_format": "torchvision", "arch": arch}
    state = _current_torchvision_layout(read_torch_state_dict(source))
    model = _import_state(spec, state, source, ("backbone.body.", "backbone.fpn.", "rpn.head.conv.",
                                                "rpn.head.cls_logits.", "rpn.head.bbox_pred."), _torchvision_key)
    save_checkpoint(model, destination, spec)
    return spec
