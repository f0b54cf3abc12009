"""Writing files so that readers never see them half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Sequence

from ..errors import OutputError, UsageError


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = Path(path)
    # Named before it is made, so that Ctrl-C or SIGTERM arriving at any point after (they are raised
    # between any two steps, see cli/base.py) finds the name to remove: mkstemp's name came too late.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")  # as outputs.py sweeps them
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as error:
            raise OutputError(f"{path}: cannot write ({_why_unwritable(path, error)})") from error
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # made 0600 while being written; now the usual mode
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    """Remove a temporary file if it is there (it may never have been made, or its folder may not exist)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s folders that exists but is no folder (a file): nothing can be written under it."""
    for folder in reversed(Path(path).parents):
        # os.path's checks answer False where Path.exists() raises (a folder the user may not enter).
        if os.path.exists(folder) and not os.path.isdir(folder):
            return folder
    return None


def check_writable_under(path: Path) -> None:
    """Raise :class:`OutputError` before any work when a file stands where a folder of ``path`` should be."""
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise OutputError(f"{path}: cannot write ({blocking} is a file, not a folder)")


def check_writable_folder(folder: Path, writes: str) -> None:
    """Raise :class:`OutputError` before any work when ``--out`` ``folder`` cannot be the folder that
    ``writes`` (what goes into it, for the message) needs: it is a file, or a file stands in its path."""
    check_writable_under(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OutputError(f"--out {folder}: a file, where {writes} into a folder")


def _why_unwritable(path: Path, error: OSError) -> str:
    """What stops ``path`` being written: a file where a folder of its path should be (mkdir reports that
    as "File exists", which misleads), else the system's reason."""
    blocking = file_in_the_way(path)
    return f"{blocking} is a file, not a folder" if blocking is not None else error.strerror or str(error)


def check_destination(destination: Path, suffixes: Sequence[str], what: str, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before any work, to write ``what`` to ``destination`` where rpn could not read it back
    (readers go by the suffix: one of ``suffixes``), where it would replace one of ``inputs``, or where
    a file stands in place of one of its folders."""
    if destination.suffix not in suffixes:
        named = " or ".join((", ".join(suffixes[:-1]), suffixes[-1]) if len(suffixes) > 1 else suffixes)
        raise UsageError(f"{destination}: {what} is written to a {named} file (rpn tells files apart by their suffix)")
    check_writable_under(destination)
    if os.path.isdir(destination):
        raise OutputError(f"{destination}: a folder; name the file to write")
    for source in inputs:
        if os.path.exists(destination) and os.path.exists(source) and os.path.samefile(destination, source):
            raise UsageError(f"{destination}: that is the file being read ({source}); write to another")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex: what names cached exports and ties an int8 model to its checkpoint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
