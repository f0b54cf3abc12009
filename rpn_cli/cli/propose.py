"""`rpn propose`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import RpnError, UsageError
from ..version import __version__
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


@app.command()
@interruptible
def propose(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Image files, folders, globs, or - to read paths from stdin.")] = None,
    checkpoint: CheckpointOption = None,
    backend: BackendOption = "auto",
    trust_torchscript: TrustTorchScriptOption = False,
    manifest: Annotated[Optional[Path], typer.Option("--manifest", help="A list of image paths: text (one per line), CSV or Parquet.")] = None,
    manifest_column: Annotated[Optional[str], typer.Option("--manifest-column", help="The CSV/Parquet column of paths (default: path, else the first).")] = None,
    engine: Annotated[str, typer.Option(help="local, or ray (Ray Data; needs --out).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (default: RAY_ADDRESS, else start a local Ray).")] = None,
    actors: Annotated[Optional[int], typer.Option("--actors", min=1, help="Ray: model actors (default: one per GPU, else half the CPUs).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="A folder for the outputs, or one .json/.pkl file when a single format writes one file (json: an array of records).")] = None,
    output_format: Annotated[Optional[str], typer.Option("--format", "-f", help="jsonl (stdout); per image: json, png (overlay), yolo (.txt); one file: coco (results), coco-instances (a dataset), labelstudio (tasks with predictions), detectron2 (precomputed proposals, .pkl). Comma-separated.  [default: jsonl, or json with --out]")] = None,
    image_ids_file: Annotated[Optional[Path], typer.Option("--image-ids", help="A COCO annotation file whose image ids the coco, coco-instances and detectron2 outputs use (matched by path, else file name).  [default: a file's number when all names are numbers (COCO's), else 1..N in input order]")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[str, typer.Option(help="The network's precision: auto (bfloat16 on CPUs that have it, float16 on CUDA), float32, bfloat16, float16. Decoding and NMS stay float32.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Threads decoding images while the model runs, one image at a time (lanes decode in their own threads). [default: the cores the network leaves free; 0 decodes between images]")] = None,
    lanes: Annotated[Optional[int], typer.Option(min=1, help="Images run at once on the CPU, each in a thread of its own from decoding to proposals, the network on an equal share of the cores (--batch-size 1; the local engine). [default: where ONNX Runtime runs the network on the CPU (auto on CPUs), enough to use every core, at most 8; else 1]")] = None,
    pre_nms_top_n: PreNmsTopNOption = None,
    post_nms_top_n: Annotated[Optional[int], typer.Option("--post-nms-top-n", help="Boxes kept after NMS. [default: the checkpoint's; shipped: 300]")] = None,
    nms_iou: NmsIouOption = None,
    min_size: MinSizeOption = None,
    vote_iou: VoteIouOption = None,
    level_offsets: LevelOffsetsOption = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Write at most this many proposals per image.")] = None,
    min_score: Annotated[Optional[float], typer.Option("--min-score", help="Drop proposals scoring below this.")] = None,
    draw_top: Annotated[int, typer.Option("--draw-top", min=0, help="Proposals drawn on PNG overlays and --sheet thumbnails (the best first, coloured by rank).")] = 10,
    sheet: Annotated[Optional[Path], typer.Option("--sheet", help="Also write a contact sheet: thumbnails of the images (the first 60) with their best proposals, one PNG.")] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip images whose outputs exist in --out.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first image that fails.")] = False,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse larger images (decompression bomb guard).")] = 89_478_485,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
) -> None:
    """Propose object boxes for images: JSON Lines on stdout, or files in --out."""
    from ..inference.prefetch import DecodeAhead
    from ..io.inputs import expand_inputs, read_manifest

    decoded_ahead = None
    try:
        if engine not in ("local", "ray"):
            raise UsageError(f"--engine {engine}: choose local or ray")
        given = list(inputs or [])
        if manifest is not None:
            given += read_manifest(manifest, manifest_column)
        if not given:
            raise UsageError("give images, folders, globs, - or --manifest")
        items = expand_inputs(given, recursive, sys.stdin if "-" in given else None)
        if not items:
            raise UsageError("no images in the inputs given")
        if engine == "local" and not skip_existing:
            # Before anything imports torch: see prefetch.py.
            decoded_ahead = DecodeAhead(items, max_pixels)
        from ..inference.proposer import Proposer, check_proposal_limits
        from ..io.files import check_writable_under
        from ..io.outputs import (
            ProposalWriter,
            check_output_names,
            check_output_paths,
            output_plan,
            parse_formats,
        )
        from ..io.tool_formats import default_image_ids, image_ids_from_annotations

        # The proposal layer's limits (None: the checkpoint's), for either engine.
        limits = dict(pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, nms_iou=nms_iou,
                      min_size=min_size, min_score=min_score, vote_iou=vote_iou,
                      level_offsets=parse_level_offsets(level_offsets))
        if engine == "ray":
            _run_ray(items, checkpoint=checkpoint, out=out, output_format=output_format, address=ray_address,
                     actors=actors, device=device, precision=precision, backend=backend, top_k=top_k,
                     max_pixels=max_pixels, skip_existing=skip_existing, quiet=quiet,
                     trust_torchscript=trust_torchscript, overrides=limits)
        formats = parse_formats(output_format or ("json" if out else "jsonl"))
        if out is None and any(f != "jsonl" for f in formats):
            raise UsageError(f"--format {','.join(formats)} writes files: give --out")
        if out is not None and "jsonl" in formats:
            raise UsageError("jsonl goes to stdout; with --out use the other formats")
        per_image, collected = output_plan(out, formats) if out is not None else ([], {})
        if per_image:
            check_output_names(items)
            check_output_paths(out, items, per_image)
        if sheet is not None and os.path.realpath(sheet) in {os.path.realpath(i.given) for i in items if not i.problem}:
            raise UsageError(f"--sheet {sheet} would replace an input; choose another file")
        if sheet is not None:
            check_writable_under(sheet)
        if skip_existing and collected:
            raise UsageError(f"--skip-existing resumes per-image outputs; {', '.join(collected)} holds every "
                             "image in one file: run without it")
        given_paths = [item.given for item in items]
        image_ids = (image_ids_from_annotations(image_ids_file, given_paths) if image_ids_file
                     else default_image_ids(given_paths))
        checkpoint = checkpoint_or_default(checkpoint)
        check_proposal_limits(checkpoint, **limits)  # before a note on building anything
        note_first_onnx_build(checkpoint, device, precision, backend, quiet)
        proposer = Proposer(checkpoint, device=device, precision=precision, backend=backend,
                            trust_torchscript=trust_torchscript, top_k=top_k, max_pixels=max_pixels, **limits)
        writer = ProposalWriter(formats=formats, out=out, stream=sys.stdout, draw_top=draw_top,
                                image_ids=image_ids, model_version=f"rpn-cli {__version__} {checkpoint.name}",
                                sheet=sheet)
        code = _run_propose(items, proposer, writer, batch_size=batch_size, workers=workers, lanes=lanes,
                            skip_existing=skip_existing, fail_fast=fail_fast, quiet=quiet, decoded_ahead=decoded_ahead)
    except RpnError as error:
        fail(error)
    finally:
        if decoded_ahead is not None:
            decoded_ahead.close()
    raise typer.Exit(code)


def _run_ray(items, *, checkpoint, out, output_format, address, actors, device, precision, backend, top_k,
             max_pixels, skip_existing, quiet, trust_torchscript, overrides) -> None:
    """``rpn propose --engine ray``: always ends the command (exit 0, or 1 when an image failed)."""
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ..inference.backends import resolve_backend
    from ..inference.devices import DEVICE_CHOICES
    from ..inference.ray_engine import propose_with_ray
    from ..inference.runtime import load_model

    if out is None:
        raise UsageError("--engine ray writes shards into a folder: give --out")
    path = checkpoint_or_default(checkpoint)
    # What the actors will ask of the file and the device (an exported file runs only as exported; int8
    # only on a CPU), before Ray starts. The kind of device only: the actors may have a GPU this process lacks.
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected one of {', '.join(DEVICE_CHOICES)}")
    resolve_backend(backend, torch.device("cuda" if device.startswith("cuda") else "cpu"), precision, path)
    spec = load_model(path, "cpu", trust_torchscript=trust_torchscript).spec
    spec.proposal_layer(**overrides)  # limits checked here (the level offsets against the levels), before Ray starts
    with Progress(TextColumn("ray"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=err, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("images", total=len(items), rate="")
        started = time.perf_counter()

        def advance(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            progress.update(task, completed=done, total=total, rate=f"{done / elapsed:.1f} images/s" if elapsed else "")

        summary = propose_with_ray(items, path, out, overrides, spec.preprocess, output_format=output_format or "jsonl",
                                   address=address or os.environ.get("RAY_ADDRESS"), device=device,
                                   precision=precision, backend=backend, actors=actors, top_k=top_k,
                                   max_pixels=max_pixels, skip_existing=skip_existing, progress=advance, trust_torchscript=trust_torchscript)
    if not quiet:
        err.print(f"{summary.images} images, {summary.proposals} proposals, {summary.failed} failed"
                  + (f", {summary.skipped} skipped (records exist)" if summary.skipped else "")
                  + f", {summary.seconds:.1f} s, {len(summary.shards)} shards in {out}", markup=False, highlight=False)
    raise typer.Exit(1 if summary.failed else 0)


def _run_propose(items, proposer, writer, *, batch_size, workers, skip_existing, fail_fast, quiet,
                 lanes=None, decoded_ahead=None) -> int:
    """The local engine's loop: results into ``writer``, errors and progress on stderr; the exit code."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..inference.engine import Timings
    from ..io.outputs import pending_items

    started = time.perf_counter()
    skipped = 0
    if skip_existing and writer.out is not None:
        items, skipped = pending_items(items, writer.out, writer.per_image)
    timings = Timings()
    failed_fast = False
    with Progress(TextColumn("proposals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, disable=quiet or not err.is_terminal, transient=True) as progress:
        task = progress.add_task("images", total=len(items))
        results = proposer.stream(items, batch_size=batch_size, workers=workers, lanes=lanes, timings=timings,
                                  decoded_ahead=decoded_ahead)
        try:
            for result in results:
                progress.advance(task)
                if result.error is not None:
                    err.print(f"error: {result.error}", markup=False, highlight=False, soft_wrap=True)
                    if fail_fast:
                        failed_fast = True
                        results.close()  # lanes stop, and a PyTorch network's threads come back, before finishing
                        break
                    continue
                writer.write(result)
        except BrokenPipeError:
            # The reader went away (``rpn propose dir | head``): stop quietly, as coreutils do.
            devnull = open(os.devnull, "w")
            os.dup2(devnull.fileno(), sys.stdout.fileno())
            results.close()
            return 141
        except KeyboardInterrupt:
            results.close()
            raise
        except RpnError as error:
            results.close()
            fail(error)
    writer.finish(complete=not failed_fast)
    if not quiet:
        summary = (f"{timings.images} images, {timings.proposals} proposals, {timings.failed} failed"
                   + (f", {skipped} skipped (outputs exist)" if skipped else "")
                   + f", {time.perf_counter() - started:.1f} s")
        err.print(summary, markup=False, highlight=False)
    return 1 if timings.failed else 0
