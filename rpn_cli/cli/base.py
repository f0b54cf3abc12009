"""The ``rpn`` command line: parses options, calls the library, reports. No model logic here."""

from __future__ import annotations

import functools
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import (
    ClickException,  # typer's own click: what its parser raises
)

from ..errors import RpnError, UsageError
from ..version import __version__
from ..weights import DEFAULT_CHECKPOINT


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


def checkpoint_or_default(checkpoint: Optional[Path]) -> Path:
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
    typer.Option("--backend", help="What runs the network: torch, onnxruntime (float32; our checkpoint's ONNX export, built once into ~/.cache/rpn-cli), onnxruntime-int8 (the shipped checkpoint's int8 model; for others, rpn export --format onnx-int8), or auto (on the CPU: int8 where the checkpoint has one; else PyTorch bfloat16 on CPUs that have it, ONNX Runtime float32 without, when the onnx extra is installed)."),
]
TrustTorchScriptOption = Annotated[
    bool,
    typer.Option("--trust-torchscript", help="Allow a TorchScript (.pt) checkpoint. Loading one RUNS CODE THE FILE CARRIES: only for files you made or trust."),
]

# The proposal layer's limits, as rpn propose and rpn eval take them (None: the checkpoint's).
PreNmsTopNOption = Annotated[
    Optional[int],
    typer.Option("--pre-nms-top-n", help="Boxes kept before NMS (per level). [default: the checkpoint's; shipped: 3000]"),
]
NmsIouOption = Annotated[
    Optional[float],
    typer.Option("--nms-iou", help="NMS IoU threshold. [default: the checkpoint's; shipped: 0.7]"),
]
MinSizeOption = Annotated[
    Optional[float],
    typer.Option("--min-size", help="Smallest box side, in resized-image pixels. [default: the checkpoint's; shipped: 8]"),
]
VoteIouOption = Annotated[
    Optional[float],
    typer.Option("--vote-iou", help="Box voting: each box kept by NMS moves to the score-weighted mean of the candidates overlapping it by this IoU; 0: none (the seed's layer). [default: the checkpoint's; shipped: 0.7]"),
]
LevelOffsetsOption = Annotated[
    Optional[str],
    typer.Option("--level-offsets", help="Comma-separated numbers, one a pyramid level (finest first), added to the objectness log-odds of that level's anchors before the levels compete in NMS and the ranking; zeros (one a level) rank by the network's own scores. [default: the checkpoint's; shipped: 0,0,-0.75]"),
]


def parse_level_offsets(text: str | None) -> tuple[float, ...] | None:
    """``--level-offsets`` as the proposal layer takes it (None: the checkpoint's)."""
    if text is None:
        return None
    fields = text.split(",")
    if any(not field.strip() for field in fields):  # "0,,-1" would shift the values onto other levels
        raise UsageError(f"--level-offsets {text}: expected one number a pyramid level, none left empty")
    values = parse_comma_separated(text, "--level-offsets", float, "numbers, one a pyramid level")
    if not all(math.isfinite(value) for value in values):
        raise UsageError(f"--level-offsets {text}: expected finite numbers, one a pyramid level")
    return tuple(values)


def parse_comma_separated(text: str, option: str, kind: type, what: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise UsageError(f"{option} {text}: expected comma-separated {what}") from error


def parse_sizes(text: str, option: str) -> list[int]:
    values = parse_comma_separated(text, option, int, "whole numbers of pixels")
    if not values or min(values) < 32:
        raise UsageError(f"{option} {text}: expected sizes of at least 32 pixels")
    return values


def parse_floats(text: str, option: str) -> list[float]:
    values = parse_comma_separated(text, option, float, "numbers")
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{option} {text}: expected positive numbers")
    return values


def note_first_onnx_build(checkpoint: Path, device: str, precision: str, backend: str, quiet: bool) -> None:
    """Say why the first run with ONNX Runtime pauses: it builds the export it then keeps."""
    from ..inference.backends import EXPORTED_SUFFIXES, onnx_cache_path, resolve_backend
    from ..inference.devices import resolve_device

    if quiet or not checkpoint.is_file() or checkpoint.suffix in EXPORTED_SUFFIXES:
        return
    if resolve_backend(backend, resolve_device(device), precision, checkpoint) != "onnxruntime":
        return
    built = onnx_cache_path(checkpoint)
    if built.is_file():
        return
    from ..io.checkpoint import load_checkpoint

    try:  # a file that will not load is reported by the run itself, in one line, with nothing before it
        load_checkpoint(checkpoint, "cpu")
    except RpnError:
        return
    err.print(f"note: building the ONNX Runtime model of {checkpoint.name} once (under a minute); it is kept in "
              f"{built.parent}", markup=False, highlight=False, soft_wrap=True)
