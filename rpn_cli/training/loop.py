"""Training an RPN: data, teacher pseudo-labels, targets, losses, resumable epochs."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..errors import CheckpointError, ImageError, TrainingError, UsageError
from ..evaluation.recall import (
    average_recall_report,
    proposals_from_model,
    readable_only,
)
from ..inference.devices import default_decode_workers
from ..inference.proposer import Proposer
from ..io.checkpoint import (
    load_checkpoint,
    load_plain_torch_file,
    read_spec,
    save_checkpoint,
)
from ..io.converters import load_imagenet_weights
from ..io.datasets import (
    AnnotatedImage,
    load_coco,
    load_dataset,
    split_validation,
    without_photos_of,
)
from ..io.files import atomic_write_bytes
from ..io.images import load_image
from ..model.network import RegionProposalNetwork, deepened_head
from ..model.preprocess import pad_batch, resize_image, to_tensor
from ..model.spec import MAX_HEAD_DEPTH, ModelSpec, default_feature_scale
from .averaging import weight_average
from .quantization import make_quantization_aware, snap_to_int8_grid
from .targets import BOX_LOSSES, TargetSettings, rpn_losses
from .teacher import (
    YoloxTeacher,
    merge_teacher_boxes,
    merged_confidence,
    partial_label_targets,
)

TRAINING_PRECISIONS = ("float32", "bfloat16")

# How the command line names the settings a resumed run is compared on (library-only ones by field name).
_OPTION_NAMES = {
    "sources": "DATA", "partial_sources": "--partial", "validation_sets": "--validation-set",
    "validation_count": "--validation", "batch_size": "--batch-size", "learning_rate": "--lr",
    "train_sizes": "--train-sizes", "backbone_weights": "--backbone-weights", "init_checkpoint": "--init",
    "teacher_threshold": "--teacher-threshold", "teacher_ignore_threshold": "--teacher-ignore-threshold",
    "soft_targets": "--soft-targets", "confidence_weights": "--confidence-weights", "box_loss": "--box-loss",
    "box_loss_weight": "--box-loss-weight",
    "clip_gradient_norm": "--clip-gradient-norm", "precision": "--precision", "allowed_border": "--allowed-border",
    "epochs": "--epochs", "seed": "--seed", "teacher": "--teacher", "shorter_side": "--shorter-side",
    "head_depth": "--head-depth", "quantization_aware": "--quantization-aware",
}
# Not compared: where the run lives and how it was typed, loading threads (they change nothing in the
# result), and what _resume checks itself (the setup, the moving average).
_NOT_COMPARED = ("work_dir", "command", "loader_threads", "ema_decay", "freeze_blocks")


@dataclass
class TrainConfig:
    sources: list[str]
    work_dir: str
    # COCO files that annotate only the categories they list (every other object comes from the teacher).
    partial_sources: list[str] = field(default_factory=list)
    # COCO files of fully annotated photos to validate on instead of a split of the sources; photos of
    # the same file name are left out of training.
    validation_sets: list[str] = field(default_factory=list)
    epochs: int = 12
    batch_size: int = 4
    learning_rate: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    validation_count: int = 50
    train_sizes: list[int] = field(default_factory=lambda: [416, 448, 480, 512, 544, 576, 608])
    # None: 4 when the trunk starts from trained weights (ImageNet or --init), 0 from scratch.
    freeze_blocks: int | None = None
    backbone_weights: str | None = None
    init_checkpoint: str | None = None
    # None: the spec's (or --init's) head; a number: 3x3 convolutions in the head, those added to an --init
    # checkpoint's starting as the identity (model/network.py, deepened_head).
    head_depth: int | None = None
    teacher: str | None = None
    teacher_threshold: float = 0.3
    # Teacher boxes from this objectness up to teacher_threshold mark regions left out of the loss
    # (ignored, not background) on photos whose annotations are partial or absent.
    teacher_ignore_threshold: float = 0.1
    # Distillation: a positive anchor on a teacher box learns the teacher's objectness, not 1.
    soft_targets: bool = False
    # Distillation: a positive anchor on a teacher box counts in the loss by the teacher's objectness.
    confidence_weights: bool = False
    # Each convolution the int8 model quantizes trains with its weights as int8 rounds them, and the
    # file holds the rounded weights (training/quantization.py).
    quantization_aware: bool = False
    # The box term: "smooth-l1" on deltas or "giou" on decoded boxes, and its weight against objectness.
    box_loss: str = "smooth-l1"
    box_loss_weight: float = 1.0
    # None: no clipping; a number: each step's gradient is scaled down to at most this L2 norm over all
    # trained weights (torch's clip_grad_norm_), which keeps one outlier batch from blowing up the run.
    clip_gradient_norm: float | None = None
    # None: the file holds the last step's weights; a decay: it holds their unbiased exponential moving
    # average over the run's steps (training/averaging.py), and each epoch is validated with both.
    ema_decay: float | None = None
    # "bfloat16": the network's forward pass under autocast (losses and weights stay float32); on a CPU
    # with bfloat16 units MobileNetV2 trains 1.4-1.55x faster, Lite0 0.89x as fast
    # (benchmarks/benchmark_train.py); untried on a GPU.
    precision: str = "float32"
    # None: every anchor takes part (torchvision's rule); a number: anchors crossing the border by more
    # than that many pixels are left out (the paper's rule is 0). See README, "Training".
    allowed_border: float | None = None
    # Threads decoding and augmenting the next batch while one trains; None: the cores the network
    # leaves free (none on a CPU, where its own threads take them all).
    loader_threads: int | None = None
    command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse settings no run can have (:class:`UsageError`, named as the command line names them)."""
        if self.confidence_weights and self.teacher is None:
            raise UsageError("--confidence-weights needs --teacher")
        if self.quantization_aware and not self.init_checkpoint and not self.backbone_weights:
            raise UsageError("--quantization-aware fine-tunes trained weights: give --init or --backbone-weights")
        if self.box_loss not in BOX_LOSSES:
            raise UsageError(f"--box-loss {self.box_loss}: choose {' or '.join(BOX_LOSSES)}")
        if self.precision not in TRAINING_PRECISIONS:
            raise UsageError(f"--precision {self.precision}: choose {' or '.join(TRAINING_PRECISIONS)}")
        if not 0 < self.learning_rate < math.inf:
            raise UsageError(f"--lr {self.learning_rate}: expected a number above 0")
        if not 0 <= self.box_loss_weight < math.inf:
            raise UsageError(f"--box-loss-weight {self.box_loss_weight}: expected a number from 0 up")
        if self.allowed_border is not None and not 0 <= self.allowed_border < math.inf:
            # detectron2's -1 means "keep every anchor": here that is leaving the option out.
            raise UsageError(f"--allowed-border {self.allowed_border}: expected a number of pixels from 0 up "
                             "(leave it out to keep every anchor)")
        if self.head_depth is not None and not 1 <= self.head_depth <= MAX_HEAD_DEPTH:
            raise UsageError(f"--head-depth {self.head_depth}: expected a whole number from 1 to {MAX_HEAD_DEPTH}")
        if self.head_depth is not None and self.init_checkpoint:
            depth = read_spec(self.init_checkpoint).head.conv_depth
            if self.head_depth < depth:
                raise UsageError(f"--head-depth {self.head_depth}: {self.init_checkpoint}'s head has {depth} "
                                 "convolutions; a head can be made deeper, not shallower")
        if self.clip_gradient_norm is not None and not self.clip_gradient_norm > 0:
            raise UsageError(f"--clip-gradient-norm {self.clip_gradient_norm}: expected a number above 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UsageError(f"--ema-decay {self.ema_decay}: expected a number between 0 and 1")


@dataclass
class TrainingImage:
    path: Path
    boxes: np.ndarray  # (K, 4) x1y1x2y2, original pixels, crowd removed
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # (R, 4) crowd, unknown regions
    confidence: np.ndarray | None = None  # (K,) objectness target of each box; None: all 1


@dataclass
class TrainEvent:
    """What a training run reports to its caller (the CLI draws it)."""

    kind: str  # "teacher", "step", "epoch", "warning"
    done: int = 0
    total: int = 0
    epoch: int = 0
    losses: dict = field(default_factory=dict)
    message: str = ""


Reporter = Callable[[TrainEvent], None]


def _frozen_batchnorm(module: nn.Module) -> None:
    """BatchNorm in eval mode with fixed parameters: batches of 4 images would spoil trained statistics."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.eval()
            for parameter in layer.parameters():
                parameter.requires_grad_(False)


def trunk_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The trunk's blocks in input order (what ``freeze_blocks`` counts)."""
    if hasattr(backbone, "stages"):
        return [block for stage in backbone.stages for block in stage]
    return list(backbone.body)


def freeze_first_blocks(backbone: nn.Module, count: int) -> None:
    for block in trunk_blocks(backbone)[:count]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)


_TEACHER_CACHE_VERSION = 2


def _teacher_detections(
    images: list[AnnotatedImage], teacher: YoloxTeacher, min_score: float, cache_file: Path, report: Reporter,
) -> dict[str, np.ndarray]:
    """The teacher's detections (T, 6: box, objectness, category id) of each readable image, down to
    ``min_score``; cached in ``cache_file`` (recomputed when another teacher made it or it went less deep)."""
    cache = {}
    if cache_file.exists():
        try:
            stored = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if (isinstance(stored, dict) and stored.get("version") == _TEACHER_CACHE_VERSION
                and stored.get("teacher") == teacher.fingerprint and stored.get("min_score", 1.0) <= min_score):
            cache = stored["images"]
    found, changed = {}, False
    for done, image in enumerate(images):
        key = str(image.path)
        if key not in cache:
            try:
                boxes, scores, categories = teacher.detections(load_image(image.path), min_score)
            except ImageError as error:
                report(TrainEvent("warning", message=f"skipped: {error}"))
                continue
            cache[key] = np.concatenate((boxes.round(2), scores.round(4)[:, None], categories[:, None]), 1).tolist()
            changed = True
        rows = np.array(cache[key], np.float32).reshape(-1, 6)
        found[key] = rows[rows[:, 4] >= min_score]
        report(TrainEvent("teacher", done=done + 1, total=len(images)))
    if changed or not cache_file.exists():
        payload = {"version": _TEACHER_CACHE_VERSION, "teacher": teacher.fingerprint, "min_score": min_score,
                   "images": cache}
        atomic_write_bytes(cache_file, lambda tmp: Path(tmp).write_text(json.dumps(payload)))
    return found


def _training_images(
    images: list[AnnotatedImage], teacher: YoloxTeacher | None, threshold: float, ignore_threshold: float,
    cache_file: Path, report: Reporter, keep_confidence: bool = False,
) -> list[TrainingImage]:
    """Boxes to train on: annotations plus, with a teacher, its boxes for what they miss; unlabeled
    images only with a teacher. Crowd boxes (COCO ``iscrowd``, VOC ``difficult``) are ignore regions: many
    objects there, none boxed, so no anchor there is taught background; on partially labelled and
    unlabeled images so are the teacher's less sure boxes. With ``keep_confidence`` each teacher box carries
    its objectness. Teacher detections are cached in ``cache_file``."""
    if teacher is None:
        return [TrainingImage(image.path, image.boxes[~image.crowd], image.boxes[image.crowd]) for image in images
                if image.labelled and image.categories is None]
    detections = _teacher_detections(images, teacher, min(threshold, ignore_threshold), cache_file, report)
    result = []
    for image in images:
        rows = detections.get(str(image.path))
        if rows is None:
            continue
        annotated, crowd = image.boxes[~image.crowd], image.boxes[image.crowd]
        if image.labelled and image.categories is None:
            confident = rows[rows[:, 4] >= threshold]
            boxes = merge_teacher_boxes(annotated, confident[:, :4])
            confidence = merged_confidence(annotated, confident[:, :4], confident[:, 4]) if keep_confidence else None
            result.append(TrainingImage(image.path, boxes, crowd, confidence))
            continue
        labelled = image.categories if image.labelled else frozenset()
        boxes, confidence, ignore = partial_label_targets(annotated, labelled, rows[:, :4], rows[:, 4],
                                                          rows[:, 5].astype(np.int64), threshold, ignore_threshold)
        result.append(TrainingImage(image.path, boxes, np.concatenate((ignore, crowd)),
                                    confidence if keep_confidence else None))
    return result


def _augmented(image: Image.Image, boxes: np.ndarray, ignore: np.ndarray, confidence: np.ndarray | None,
               spec: ModelSpec, size: int, flip: bool):
    """(image tensor, boxes, ignore regions, confidence of the boxes kept) resized to shorter side ``size``,
    mirrored when ``flip``; boxes under a pixel wide or high are dropped."""
    resized = resize_image(image, spec.preprocess, size)
    sx, sy = resized.width / image.width, resized.height / image.height

    def place(rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        scaled = rows * np.array([sx, sy, sx, sy], np.float32)
        if flip:
            scaled = np.stack((resized.width - scaled[:, 2], scaled[:, 1], resized.width - scaled[:, 0], scaled[:, 3]), 1)
        keep = ((scaled[:, 2] - scaled[:, 0]) >= 1) & ((scaled[:, 3] - scaled[:, 1]) >= 1)
        return torch.from_numpy(scaled[keep].reshape(-1, 4)), keep

    (placed_boxes, kept), (placed_ignore, _) = place(boxes), place(ignore)
    placed_confidence = None if confidence is None else torch.from_numpy(confidence[kept])
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(resized, spec.preprocess), placed_boxes, placed_ignore, placed_confidence


def evaluate_model(model: RegionProposalNetwork, images: Sequence[AnnotatedImage],
                   report: Reporter = lambda event: None) -> dict:
    """AR report of ``model`` (its default proposal settings) on annotated images; an image that cannot
    be read is reported and left out of the figures (``unreadable_images`` counts them)."""
    left_out: list[AnnotatedImage] = []

    def unreadable(image: AnnotatedImage, error: ImageError) -> None:
        report(TrainEvent("warning", message=f"validation: {error}; left out of the figures"))
        left_out.append(image)

    found = proposals_from_model(Proposer.from_model(model), images, unreadable=unreadable)
    readable = readable_only(images, left_out)
    figures = average_recall_report(readable, found, (10, 100, 300)) if readable else {"images": 0}
    return {**figures, "unreadable_images": len(left_out)}


def _validate(model: RegionProposalNetwork, images: Sequence[AnnotatedImage], report: Reporter) -> dict:
    """:func:`evaluate_model` in eval mode, or nothing without validation images."""
    return evaluate_model(model.eval(), images, report) if images else {}


def _settings(run: _Run) -> dict:
    """What a resumed run's settings are compared on (``last.pt`` stores them), as JSON has them."""
    settings = {key: value for key, value in run.config.to_dict().items() if key not in _NOT_COMPARED}
    return json.loads(json.dumps({**settings, "shorter_side": run.spec.preprocess.size}))


def _changed_settings(saved: dict, now: dict) -> list[str]:
    """``--lr 0.01 (saved: 0.005)`` for each setting that differs from the saved run's (settings one of
    the two versions of rpn lacks are not compared)."""
    return [f"{_OPTION_NAMES.get(key, key)} {_shown(now[key])} (saved: {_shown(saved[key])})"
            for key in sorted(set(saved) & set(now)) if saved[key] != now[key]]


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "none"
    return "none" if value is None else str(value)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_training_state(path: Path) -> dict:
    """``last.pt`` read as plain tensors and containers: a file that needs anything else (a pickled
    object, TorchScript) is refused, never run."""
    state = load_plain_torch_file(path, "training state written by rpn train (use --restart to start over)")
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a training state written by rpn train (no model weights); "
                              "use --restart to start over or another --work-dir")
    return state


def _provenance_summary(provenance: dict) -> dict:
    """What a checkpoint started from: its training command, data and figures, and what it itself
    started from (the per-epoch history is left out)."""
    kept = ("trained_by", "command", "data", "partially_labelled_data", "validation_sets", "training_images",
            "validation", "after_training", "initialised_from", "converted_from", "source_format", "arch")  # the last three: a checkpoint from rpn convert
    summary = {key: provenance[key] for key in kept if key in provenance}
    # The file's own JSON: a history that is not a list of records (with string commands) is passed over.
    history = provenance.get("history")
    if isinstance(history, list):
        summary["epochs"] = len(history)
        # A resumed run's legs, where they differ ("command" is the last one's).
        commands = list(dict.fromkeys(epoch["command"] for epoch in history
                                      if isinstance(epoch, dict) and isinstance(epoch.get("command"), str)))
        if len(commands) > 1:
            summary["commands"] = commands
    return summary


@dataclass
class _Run:
    """A training run between its phases: what was set up, and the history so far."""

    config: TrainConfig
    spec: ModelSpec
    model: RegionProposalNetwork
    optimizer: torch.optim.Optimizer
    samples: list[TrainingImage]
    validation: list[AnnotatedImage]
    from_scratch: bool
    fixed_blocks: int
    initialised_from: dict | None
    # The moving average of the weights (--ema-decay), or None.
    average: AveragedModel | None = None
    history: list = field(default_factory=list)

    @property
    def kept_model(self) -> RegionProposalNetwork:
        """The weights the run writes: their moving average with --ema-decay, else the last step's."""
        return self.model if self.average is None else self.average.module

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.samples) / self.config.batch_size)

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then a cosine decay to 0 over all epochs."""
        total = self.steps_per_epoch * self.config.epochs
        warm = min(1.0, (step + 1) / max(self.config.warmup_steps, 1))
        return self.config.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * step / total))

    @property
    def setup(self) -> str:
        """What a saved run must agree on to be continued: the model, and which of its weights train."""
        description = self.spec.to_dict()
        backbone = description["backbone"]
        # The trunk's default scale written out or left implicit is the same network (last.pt files from
        # before the scale was recorded leave it out).
        if backbone.get("feature_scale") == default_feature_scale(backbone["name"]):
            del backbone["feature_scale"]
        setup = {"backbone": backbone, "levels": description["levels"], "from_scratch": self.from_scratch,
                 "fixed_blocks": self.fixed_blocks}
        # The head counts from --head-depth on; one convolution deep it is left implicit, as last.pt files
        # from before recorded it.
        if self.spec.head.conv_depth != 1:
            setup["head_depth"] = self.spec.head.conv_depth
        return json.dumps(setup, sort_keys=True)


def train(config: TrainConfig, spec: ModelSpec, device: torch.device, report: Reporter = lambda event: None) -> dict:
    """Train (or resume) and write ``work_dir/final.safetensors``; returns the last validation report."""
    config.check()
    if config.soft_targets and (config.teacher is None or spec.score != "sigmoid"):
        raise UsageError("--soft-targets needs --teacher and a model with sigmoid scores")
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    run = _set_up(config, spec, device, work_dir, report)
    state_file = work_dir / "last.pt"
    resumed_with = _resume(run, state_file, report) if state_file.exists() else None
    targets = TargetSettings(allowed_border=float("inf") if config.allowed_border is None else config.allowed_border)
    for epoch in range(len(run.history), config.epochs):
        started = time.time()
        try:
            losses = _train_one_epoch(run, epoch, targets, device, report)
            # A finite loss can still give a non-finite update (the epoch's last step, say): never save that.
            saved_models = [run.model] if run.average is None else [run.model, run.average.module]
            if not all(bool(torch.isfinite(parameter).all())
                       for model in saved_models for parameter in model.parameters()):
                raise TrainingError(f"epoch {epoch + 1}: the weights are no longer finite numbers (training diverged)")
        except TrainingError as error:
            advice = (f"{state_file.name} holds epoch {len(run.history)}, the last finished one: resume from it or "
                      "restart with a lower --lr" if state_file.exists() else "no epoch finished: restart with a lower --lr")
            raise TrainingError(f"{error}; {advice}") from None
        figures = _validate(run.kept_model, run.validation, report)
        last_step = _validate(run.model, run.validation, report) if run.average is not None else None
        # "seconds": the whole epoch, its validations included.
        # Each epoch names the command that trained it: a resumed run's provenance keeps every leg's.
        record = {"epoch": epoch + 1, "seconds": round(time.time() - started, 1), "losses": losses,
                  "validation": figures, "command": config.command}
        if last_step is not None:
            record["validation_last_step"] = last_step
        if resumed_with is not None:  # the first epoch after a resume
            record["resumed_with_changed_settings"] = resumed_with
            resumed_with = None
        run.history.append(record)
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": epoch + 1,
                 "history": json.dumps(run.history), "setup": run.setup, "settings": json.dumps(_settings(run))}
        if run.average is not None:
            state["average"] = run.average.state_dict()
            state["ema_decay"] = config.ema_decay
        atomic_write_bytes(state_file, lambda tmp: torch.save(state, tmp))
        report(TrainEvent("epoch", done=epoch + 1, total=config.epochs, epoch=epoch + 1, losses=losses,
                          message=json.dumps(figures) + (f" last step {json.dumps(last_step)}" if last_step else "")))
    return _finish(run, work_dir)


def training_data(config: TrainConfig, work_dir: Path,
                  report: Reporter = lambda event: None) -> tuple[list[TrainingImage], list[AnnotatedImage]]:
    """What a run trains on (boxes and ignore regions per photo, teacher boxes included; the teacher's
    detections cached in ``work_dir``) and what it validates on, from ``config``'s data options."""
    images: list[AnnotatedImage] = []
    for source in config.sources:
        images.extend(load_dataset(source))
    for source in config.partial_sources:
        images.extend(load_coco(source, partial=True))
    if config.validation_sets:
        validation = [image for source in config.validation_sets for image in load_coco(source)]
        train_images = without_photos_of(images, validation)
    else:
        complete = sum(image.labelled and image.categories is None for image in images)
        validation_count = min(config.validation_count, max(complete - 1, 0))
        train_images, validation = split_validation(images, validation_count, config.seed)
    teacher = YoloxTeacher(config.teacher) if config.teacher else None
    incomplete = sum(not image.labelled or image.categories is not None for image in train_images)
    if teacher is None and incomplete:
        report(TrainEvent("warning", message=f"{incomplete} unlabeled or partially labelled images are unused "
                                             "without --teacher"))
    samples = _training_images(train_images, teacher, config.teacher_threshold, config.teacher_ignore_threshold,
                               work_dir / "teacher_detections.json", report,
                               config.soft_targets or config.confidence_weights)
    if not samples:
        raise UsageError("no training images")
    return samples, validation


def _set_up(config: TrainConfig, spec: ModelSpec, device: torch.device, work_dir: Path, report: Reporter) -> _Run:
    """Data (validation held out, teacher boxes), the model (initialised, partly frozen) and its optimizer."""
    samples, validation = training_data(config, work_dir, report)
    initialised_from = None
    if config.init_checkpoint:
        model = load_checkpoint(config.init_checkpoint, "cpu")
        initialised_from = _provenance_summary(model.spec.provenance)
        if config.head_depth is not None:
            model = deepened_head(model, config.head_depth)
        if model.spec.proposals.level_offsets:
            # Fitted to the --init file's weights, which training changes; the rest of its layer is kept.
            report(TrainEvent("warning", message=f"{config.init_checkpoint}: its level offsets are left out (fitted "
                                                 "to its weights); fit the result's with "
                                                 "benchmarks/fit_level_offsets.py"))
            model.spec.proposals = replace(model.spec.proposals, level_offsets=())
        spec = model.spec
    else:
        if config.head_depth is not None:
            spec = replace(spec, head=replace(spec.head, conv_depth=config.head_depth))
        model = RegionProposalNetwork(spec)
        if config.backbone_weights:
            load_imagenet_weights(model.backbone, spec.backbone, Path(config.backbone_weights))
    # A trunk from scratch has no statistics to keep: its BatchNorm layers learn them (in training mode).
    from_scratch = not config.init_checkpoint and not config.backbone_weights
    if from_scratch:
        report(TrainEvent("warning", message=f"{spec.backbone.name}: no ImageNet weights or --init, "
                                             "so the trunk trains from scratch (BatchNorm included)"))
    else:
        _frozen_batchnorm(model.backbone)
    fixed_blocks = config.freeze_blocks if config.freeze_blocks is not None else (0 if from_scratch else 4)
    if from_scratch and fixed_blocks:
        report(TrainEvent("warning", message=f"--freeze-blocks {fixed_blocks} keeps random weights fixed"))
    freeze_first_blocks(model.backbone, fixed_blocks)
    if config.quantization_aware:
        make_quantization_aware(model)
    model.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    average = weight_average(model, config.ema_decay) if config.ema_decay is not None else None
    return _Run(config, spec, model, optimizer, samples, validation, from_scratch, fixed_blocks, initialised_from,
                average)


def _resume(run: _Run, state_file: Path, report: Reporter) -> list[str]:
    """Continue from ``last.pt``: weights, optimizer and history, when it was saved by this same setup.
    Returns the settings that differ from the saved run's, as the warning names them (``["unknown"]``
    where ``last.pt`` does not record them)."""
    state = _read_training_state(state_file)
    saved_setup, saved_decay = state.get("setup", run.setup), state.get("ema_decay")
    if not isinstance(saved_setup, str) or not (saved_decay is None or isinstance(saved_decay, float)):
        raise CheckpointError(f"{state_file}: not a training state written by rpn train (a bad setup or "
                              "ema_decay); use --restart to start over or another --work-dir")
    if saved_setup != run.setup:
        raise CheckpointError(f"{state_file}: saved by a run with another backbone, --head-depth, start or "
                              "--freeze-blocks; use --restart to start over or another --work-dir")
    if saved_decay != run.config.ema_decay:
        raise CheckpointError(f"{state_file}: saved by a run {_with_ema(saved_decay)}, and this one is "
                              f"{_with_ema(run.config.ema_decay)}; use --restart to start over or another --work-dir")
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.average is not None:
            run.average.load_state_dict(state["average"])
        run.history = json.loads(state["history"])[: int(state["epoch"])]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{state_file}: not a training state of this run ({_first_line(error)}); "
                              "use --restart to start over or another --work-dir") from error
    report(TrainEvent("warning", message=f"resumed from {state_file} after epoch {len(run.history)}"))
    # A run may be resumed on purpose with other settings (more or fewer epochs, a lower --lr): say so.
    saved_settings = _saved_settings(state)
    if saved_settings is None:
        report(TrainEvent("warning", message=f"{state_file} does not record its run's settings (written before "
                                             "rpn kept them, or damaged): they are not compared with these"))
        return ["unknown"]
    changed = _changed_settings(saved_settings, _settings(run))
    if changed:
        report(TrainEvent("warning", message="resumed with settings that differ from the saved run's: "
                                             + ", ".join(changed)))
    return changed


def _saved_settings(state: dict) -> dict | None:
    """The settings ``last.pt`` was saved with, or None where it has none readable."""
    try:
        settings = json.loads(state.get("settings", "null"))
    except (TypeError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def _with_ema(decay: float | None) -> str:
    return "without --ema-decay" if decay is None else f"with --ema-decay {decay}"


def _train_one_epoch(run: _Run, epoch: int, targets: TargetSettings, device: torch.device,
                     report: Reporter) -> dict[str, float]:
    """One pass over the training images in a seeded order; returns the mean losses and gradient norm."""
    config, spec, model = run.config, run.spec, run.model
    model.train()
    if not run.from_scratch:
        _frozen_batchnorm(model.backbone)
    # One generator orders the images, then samples the anchors of every step.
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    batches = _epoch_batches(run, epoch, generator)
    threads = config.loader_threads if config.loader_threads is not None else default_decode_workers(device)
    # Closed however the epoch ends, so that no loading thread outlives a failed step.
    with contextlib.closing(_load_batches(batches, spec, threads)) as loaded_batches:
        return _train_steps(run, epoch, loaded_batches, targets, device, generator, report)


def _train_steps(run: _Run, epoch: int, loaded_batches: Iterator[list], targets: TargetSettings,
                 device: torch.device, generator: torch.Generator, report: Reporter) -> dict[str, float]:
    """The steps of one epoch, one a batch of loaded samples; returns the mean losses and gradient norm."""
    config, spec, model = run.config, run.spec, run.model
    size_divisible = spec.preprocess.size_divisible
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    max_norm = config.clip_gradient_norm if config.clip_gradient_norm is not None else math.inf
    # Mean losses, and the mean gradient norm before clipping (what --clip-gradient-norm is chosen from).
    sums = {"objectness": 0.0, "box": 0.0, "gradient_norm": 0.0}
    for step, loaded in enumerate(loaded_batches):
        tensors, boxes, ignores, confidences, sizes = [], [], [], [], []
        for sample in loaded:
            if isinstance(sample, ImageError):
                report(TrainEvent("warning", message=f"skipped: {sample}"))
                continue
            tensor, scaled, ignore, confidence = sample
            tensors.append(tensor)
            boxes.append(scaled.to(device))
            ignores.append(ignore.to(device))
            confidences.append(torch.ones(len(scaled)) if confidence is None else confidence)
            sizes.append((tensor.shape[2], tensor.shape[1]))
        if not tensors:
            continue
        for group in run.optimizer.param_groups:
            group["lr"] = run.learning_rate(epoch * run.steps_per_epoch + step)
        batch = pad_batch(tensors, size_divisible).to(device)  # as inference pads
        if model.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
            levels = model(batch)
        losses = rpn_losses(levels, boxes, sizes, spec.score, spec.box_weights, spec.delta_clamp, targets,
                            generator, ignores, confidences if config.soft_targets else None, config.box_loss,
                            images_weight=confidences if config.confidence_weights else None)
        total = losses["objectness"] + config.box_loss_weight * losses["box"]
        if not torch.isfinite(total):
            # One bad step spoils every weight: stop before it does.
            raise TrainingError(f"epoch {epoch + 1}, step {step + 1}: the loss is {total.item()} (training diverged)")
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in trained if parameter.grad is not None])
        if not torch.isfinite(norm):
            raise TrainingError(f"epoch {epoch + 1}, step {step + 1}: the gradient norm is {norm.item()} "
                                "(training diverged)")
        if norm > max_norm:
            torch.nn.utils.clip_grads_with_norm_(trained, max_norm, norm)
        losses["gradient_norm"] = norm
        run.optimizer.step()
        if run.average is not None:
            run.average.update_parameters(model)
        for key in sums:
            sums[key] += losses[key].item()
        report(TrainEvent("step", done=step + 1, total=run.steps_per_epoch, epoch=epoch + 1,
                          losses={key: value / (step + 1) for key, value in sums.items()}))
    return {key: round(value / run.steps_per_epoch, 5) for key, value in sums.items()}


def _epoch_batches(run: _Run, epoch: int, generator: torch.Generator) -> list[list[tuple[TrainingImage, int, bool]]]:
    """Each step's (image, shorter side, mirrored) triples: an order from ``generator``, one size a batch
    drawn from ``train_sizes``, a coin per image; drawn up front, so loading threads cannot change them."""
    config = run.config
    rng = random.Random(config.seed * 1000 + epoch)
    order = torch.randperm(len(run.samples), generator=generator).tolist()
    batches = []
    for step in range(run.steps_per_epoch):
        size = rng.choice(config.train_sizes)
        chosen = order[step * config.batch_size:(step + 1) * config.batch_size]
        batches.append([(run.samples[index], size, rng.random() < 0.5) for index in chosen])
    return batches


def _load_sample(sample: TrainingImage, spec: ModelSpec, size: int, flip: bool):
    """:func:`_augmented` of one training image, or the :class:`ImageError` that reading it raised."""
    try:
        image = load_image(sample.path)
    except ImageError as error:
        return error
    return _augmented(image, sample.boxes, sample.ignore, sample.confidence, spec, size, flip)


def _load_batches(batches: list, spec: ModelSpec, threads: int) -> Iterator[list]:
    """The loaded samples of each batch in turn. With ``threads``, the images of the next batch are
    decoded and augmented by that many threads while the current one trains (Pillow lets go of the
    GIL while it decodes and resizes); with 0, each batch is loaded when its turn comes."""
    if threads == 0:
        for batch in batches:
            yield [_load_sample(sample, spec, size, flip) for sample, size, flip in batch]
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpn-train-load") as pool:
        def submit(batch):
            return [pool.submit(_load_sample, sample, spec, size, flip) for sample, size, flip in batch]

        pending = submit(batches[0]) if batches else []
        for index in range(len(batches)):
            current, pending = pending, submit(batches[index + 1]) if index + 1 < len(batches) else []
            yield [future.result() for future in current]


def _finish(run: _Run, work_dir: Path) -> dict:
    """Write ``final.safetensors`` with its provenance; returns the last validation figures."""
    config, spec, validation, samples = run.config, run.spec, run.validation, run.samples
    fixed_blocks, history, model = run.fixed_blocks, run.history, run.kept_model
    last_report: dict = history[-1]["validation"] if history else {}
    spec.provenance = {
        "trained_by": "rpn train",
        "command": config.command,
        "data": [str(source) for source in config.sources],
        "partially_labelled_data": list(config.partial_sources),
        "validation_sets": list(config.validation_sets),
        "training_images": len(samples),
        "validation_images": [image.image_id for image in validation],
        "teacher": Path(config.teacher).name if config.teacher else None,
        "config": {**config.to_dict(), "freeze_blocks": fixed_blocks},
        "history": history,
        "validation": last_report,
    }
    if run.initialised_from is not None:
        spec.provenance["initialised_from"] = run.initialised_from
    if config.quantization_aware:
        snap_to_int8_grid(model)
    model.spec = spec
    save_checkpoint(model, work_dir / "final.safetensors", spec)
    return last_report
