"""The library's front door: a :class:`Proposer` loads a checkpoint once and turns images into proposals.

Everything that proposes goes through it (``rpn propose``, ``rpn eval``, the Ray actors, the
benchmarks), so a notebook gets the very records the command line writes.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..io.checkpoint import read_spec
from ..io.images import DEFAULT_MAX_PIXELS, load_image, to_rgb
from ..io.inputs import InputImage, expand_inputs
from ..io.results import ImageResult
from ..model.preprocess import PreparedImage, prepare_image
from ..model.proposals import ImageProposals
from ..weights import DEFAULT_CHECKPOINT
from .backends import EXPORTED_SUFFIXES
from .devices import default_decode_workers, default_lanes, resolve_device
from .engine import Timings, propose_images
from .predict import proposals_for_batch
from .prefetch import DecodeAhead
from .runtime import load_model

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


class Proposer:
    """Proposals for images from one checkpoint, loaded once.

    ``checkpoint``: our ``.safetensors``, an ``.onnx`` export (or TorchScript with
    ``trust_torchscript``); default the shipped one. ``device``, ``precision`` and ``backend`` default
    to ``auto`` as on the command line (CUDA when there is one; bfloat16 on CPUs that have it; ONNX
    Runtime on CPUs without, see :mod:`rpn_cli.backends`). The proposal
    layer's limits (``pre_nms_top_n``, ``post_nms_top_n``, ``nms_iou``, ``min_size``, ``min_score``,
    ``vote_iou``: box voting, 0 for none; ``level_offsets``: one log-odds offset a pyramid level, ``(0, 0, 0)``
    for the network's own scores) default to the checkpoint's; ``top_k`` keeps at most that many per image.

    >>> proposer = Proposer()
    >>> result = proposer("samples/chelsea.jpg")   # or a PIL image, an (H, W, 3) uint8 RGB array,
    >>> result.boxes.shape, result.scores[:3]       # or a (3, H, W) tensor (uint8, or float in [0, 1])
    """

    def __init__(self, checkpoint: str | Path | None = None, *, device: str = "auto", precision: str = "auto",
                 backend: str = "auto", trust_torchscript: bool = False, top_k: int | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, pre_nms_top_n: int | None = None,
                 post_nms_top_n: int | None = None, nms_iou: float | None = None, min_size: float | None = None,
                 min_score: float | None = None, vote_iou: float | None = None,
                 level_offsets: Sequence[float] | None = None):
        self.checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        limits = dict(pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, nms_iou=nms_iou, min_size=min_size,
                      min_score=min_score, vote_iou=vote_iou, level_offsets=level_offsets)
        check_proposal_limits(self.checkpoint, **limits)
        model = load_model(self.checkpoint, resolve_device(device), precision, trust_torchscript=trust_torchscript,
                           backend=backend)
        self._setup(model, top_k, max_pixels, limits)

    @classmethod
    def from_model(cls, model, *, top_k: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   **limits) -> "Proposer":
        """A proposer around a network already in memory (one being trained, say), as it is."""
        proposer = cls.__new__(cls)
        proposer.checkpoint = None
        proposer._setup(model, top_k, max_pixels, limits)
        return proposer

    def _setup(self, model, top_k: int | None, max_pixels: int | None, limits: dict) -> None:
        for name, value in (("top_k", top_k), ("max_pixels", max_pixels)):
            if value is not None and not _is_count(value, 1):
                raise UsageError(f"{name} {value!r}: expected a whole number from 1 up, or None")
        self.model = model
        self.spec = model.spec
        self.proposal_layer = model.spec.proposal_layer(**limits)
        self.top_k = top_k
        self.max_pixels = max_pixels

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __repr__(self) -> str:
        return (f"Proposer({str(self.checkpoint) if self.checkpoint else 'a model in memory'}, "
                f"{self.spec.backbone.name}, {self.model.precision} on {self.device})")

    def __call__(self, image: ImageLike) -> ImageProposals:
        """Proposals of one image, in its original pixels, best first."""
        return self.propose_prepared([self.prepare(image)])[0]

    def prepare(self, image: ImageLike) -> PreparedImage:
        """Resize and normalise an image (a path is decoded as ``rpn propose`` decodes it)."""
        rgb = _as_pil(image, self.max_pixels)
        if rgb.width == 0 or rgb.height == 0:
            raise UsageError(f"an image of {rgb.width}x{rgb.height} pixels has nothing to propose on")
        return prepare_image(rgb, self.spec.preprocess)

    def propose_prepared(self, images: Sequence[PreparedImage]) -> list[ImageProposals]:
        """Proposals of prepared images run as one batch (give images of one padded size: see
        :func:`rpn_cli.engine.propose_images`)."""
        return proposals_for_batch(self.model, images, self.proposal_layer, self.top_k)

    def stream(self, inputs: Iterable[str | Path | InputImage], *, batch_size: int = 1, workers: int | None = None,
               lanes: int | None = None, timings: Timings | None = None,
               decoded_ahead: DecodeAhead | None = None) -> Iterator[ImageResult]:
        """One :class:`ImageResult` per input, in input order, decoding ahead in ``workers`` threads
        (default: the cores the network leaves free), or ``lanes`` images at once on a CPU, each on its
        own share of the cores (default: :func:`rpn_cli.inference.devices.default_lanes`; with a
        PyTorch network, PyTorch's thread count is that share until the stream ends or is closed).
        Paths may be files, folders or globs; a failure is a result with an ``error`` line, and the
        stream goes on."""
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        items: list[InputImage] = []
        for entry in inputs:
            if not isinstance(entry, (str, Path, InputImage)):
                raise UsageError(f"stream() reads files, folders and globs, not a {type(entry).__name__}; "
                                 "call the proposer itself on an image in memory")
            if isinstance(entry, str) and not entry:
                raise UsageError("an empty path: give a file, a folder or a glob")
            items.extend([entry] if isinstance(entry, InputImage) else expand_inputs([str(entry)]))
        if not _is_count(batch_size, 1):
            raise UsageError(f"batch_size {batch_size!r}: expected 1 or more")
        if workers is not None and not _is_count(workers, 0):
            raise UsageError(f"workers {workers!r}: expected 0 or more")
        if lanes is not None and not _is_count(lanes, 1):
            raise UsageError(f"lanes {lanes!r}: expected 1 or more")
        workers = default_decode_workers(self.device) if workers is None else int(workers)
        lanes = default_lanes(self.model) if lanes is None else int(lanes)
        batch_size = int(batch_size)
        return propose_images(items, self.model, self.proposal_layer, batch_size=batch_size, workers=workers,
                              lanes=lanes, top_k=self.top_k, max_pixels=self.max_pixels, timings=timings,
                              decoded_ahead=decoded_ahead)


def check_proposal_limits(checkpoint: Path, **limits) -> None:
    """Refuse bad proposal-layer limits for one of our checkpoints before it is loaded (which may mean
    building its ONNX model first); exported files are checked once loaded."""
    if Path(checkpoint).suffix not in EXPORTED_SUFFIXES and Path(checkpoint).is_file():
        read_spec(checkpoint).proposal_layer(**limits)


def _is_count(value, least: int) -> bool:
    """An integer (numpy's too, not a bool) of at least ``least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _as_pil(image: ImageLike, max_pixels: int | None) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor."""
    if isinstance(image, str) and not image:
        raise UsageError("an empty path: give an image file")
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels)
    if isinstance(image, Image.Image):
        # As a file of that mode is read (16-bit scaled, alpha over white); its orientation is the caller's.
        return to_rgb(image)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise UsageError(f"a tensor image must be (3, H, W), got {tuple(tensor.shape)}")
        if tensor.dtype != torch.uint8:
            if not tensor.is_floating_point():
                raise UsageError(f"a tensor image must be uint8, or float in [0, 1]; got {tensor.dtype}")
            tensor = tensor.float()
            if tensor.isnan().any():
                raise UsageError("a float tensor image must hold values in [0, 1]; it holds nan")
            if tensor.numel() and not (0 <= tensor.min() and tensor.max() <= 1):
                raise UsageError(f"a float tensor image must hold values in [0, 1], not {float(tensor.min()):g} to "
                                 f"{float(tensor.max()):g} (divide 8-bit values by 255)")
            tensor = (tensor * 255).round().to(torch.uint8)
        image = tensor.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UsageError(f"an array image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    raise UsageError(f"cannot read an image from a {type(image).__name__}")
