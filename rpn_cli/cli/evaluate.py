"""`rpn evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..errors import RpnError, UsageError
from .base import (
    BackendOption,
    CheckpointOption,
    LevelOffsetsOption,
    MinSizeOption,
    NmsIouOption,
    PreNmsTopNOption,
    TrustTorchScriptOption,
    VoteIouOption,
    app,
    checkpoint_or_default,
    err,
    fail,
    interruptible,
    note_first_onnx_build,
    parse_level_offsets,
)


@app.command(name="eval")
@interruptible
def evaluate(
    annotations: Annotated[Path, typer.Argument(help="A COCO .json annotation file or a VOC folder.")],
    checkpoint: CheckpointOption = None,
    backend: BackendOption = "auto",
    trust_torchscript: TrustTorchScriptOption = False,
    proposals: Annotated[Optional[Path], typer.Option("--proposals", help="A JSON Lines file from rpn propose, instead of running a checkpoint.")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image folder (default: images/ beside a COCO file).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16 (as rpn propose).")] = "auto",
    post_nms_top_n: Annotated[Optional[int], typer.Option("--post-nms-top-n", help="Proposals per image when running a checkpoint.")] = None,
    pre_nms_top_n: PreNmsTopNOption = None,
    nms_iou: NmsIouOption = None,
    min_size: MinSizeOption = None,
    vote_iou: VoteIouOption = None,
    level_offsets: LevelOffsetsOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate on the first N images only.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="An annotated image that cannot be read is an error (exit 5), not left out of the figures with a warning.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write recall curves to this PNG (needs matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Class-agnostic average recall (AR@10/100/300/1000) of proposals against annotations."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from ..errors import DataError
    from ..evaluation.recall import (
        average_recall_report,
        load_ground_truth,
        proposals_from_jsonl,
        proposals_from_model,
        readable_only,
        write_recall_plot,
    )

    left_out = []

    def unreadable(image, error) -> None:
        if strict:
            raise DataError(f"{error} (an annotated image; --strict)")
        err.print(f"warning: {error}; left out of the figures", markup=False, highlight=False, soft_wrap=True)
        left_out.append(image)

    try:
        layer_options = {"--post-nms-top-n": post_nms_top_n, "--pre-nms-top-n": pre_nms_top_n, "--nms-iou": nms_iou,
                         "--min-size": min_size, "--vote-iou": vote_iou, "--level-offsets": level_offsets}
        given = [name for name, value in layer_options.items() if value is not None]
        if proposals is not None and given:
            raise UsageError(f"{', '.join(given)}: the proposal layer's options apply when running a checkpoint, "
                             "not to a --proposals file")
        ground_truth = load_ground_truth(annotations, images, limit)
        if proposals is not None:
            found = proposals_from_jsonl(proposals, ground_truth)
        else:
            from ..inference.proposer import Proposer, check_proposal_limits

            checkpoint = checkpoint_or_default(checkpoint)
            limits = dict(post_nms_top_n=post_nms_top_n, pre_nms_top_n=pre_nms_top_n, nms_iou=nms_iou,
                          min_size=min_size, vote_iou=vote_iou, level_offsets=parse_level_offsets(level_offsets))
            check_proposal_limits(checkpoint, **limits)  # before a note on building anything
            note_first_onnx_build(checkpoint, device, precision, backend, quiet)
            proposer = Proposer(checkpoint, device=device, precision=precision, backend=backend,
                                trust_torchscript=trust_torchscript, **limits)
            with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                          disable=quiet or not err.is_terminal, transient=True) as progress:
                task = progress.add_task("images", total=len(ground_truth))
                found = proposals_from_model(proposer, ground_truth, lambda: progress.advance(task), unreadable)
            ground_truth = readable_only(ground_truth, left_out)
            if not ground_truth:
                raise DataError(f"{annotations}: none of its images could be read")
        report = average_recall_report(ground_truth, found)
        report["unreadable_images"] = len(left_out)
        if plot is not None:
            write_recall_plot(ground_truth, found, plot)
    except RpnError as error:
        fail(error)
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table("measure", "value")
    for key, value in report.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console(highlight=False).print(table)
