"""Turning command-line inputs (files, folders, globs, ``-``) into an ordered list of images."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TextIO

from .images import IMAGE_SUFFIXES

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputImage:
    """One image to process. ``given``: the path as the user wrote it (or as joined from a folder);
    ``relative``: its path inside the folder it came from, for naming outputs; ``problem``: why it
    cannot be read, when that is known before reading (missing path, empty glob)."""

    given: str
    relative: str
    problem: str | None = None


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def _folder_images(folder: str, recursive: bool) -> list[InputImage]:
    base = Path(folder)
    found = base.rglob("*") if recursive else base.iterdir()
    files = sorted(p for p in found if p.is_file() and _is_image(p.name))
    return [InputImage(os.path.join(folder, str(p.relative_to(base))), str(p.relative_to(base))) for p in files]


def expand_inputs(inputs: Iterable[str], recursive: bool = False, stdin: TextIO | None = None) -> list[InputImage]:
    """Every image the inputs name, in the order given (folders and globs sorted).

    ``-`` reads one path per line from ``stdin``. A path that does not exist or
    a glob that matches nothing is kept with a ``problem``, so the run can
    report it and go on.
    """
    result: list[InputImage] = []
    for item in inputs:
        if not item:
            result.append(InputImage(item, item, "an empty path (an unset shell variable?)"))
        elif item == "-":
            lines = [line.strip() for line in (stdin.read().splitlines() if stdin else [])]
            result.extend(expand_inputs([line for line in lines if line and line != "-"], recursive))
        elif os.path.isdir(item):
            result.extend(_folder_images(item, recursive))
        elif os.path.isfile(item):
            result.append(InputImage(item, os.path.basename(item)))
        elif os.path.exists(item):
            # Opening a named pipe would wait for a writer forever; devices and sockets are no images.
            result.append(InputImage(item, os.path.basename(item), "not a regular file (a pipe, device or socket)"))
        elif _GLOB_CHARS & set(item):
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m) and _is_image(m))
            if not matches:
                result.append(InputImage(item, os.path.basename(item), "no image matches this pattern"))
            result.extend(InputImage(m, os.path.basename(m)) for m in matches)
        else:
            result.append(InputImage(item, os.path.basename(item), "no such file or folder"))
    return result


def read_manifest(path: str | Path, column: str | None = None) -> list[str]:
    """Image paths listed in a manifest: a text file (one per line), or a column of a CSV or Parquet
    file (``column``, default ``path``, else the first column). Relative paths are kept as written."""
    from ..errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: a folder, not a manifest (a text, CSV or Parquet file listing images); "
                         "give a folder as an input instead")
    if not path.is_file():
        raise UsageError(f"{path}: no such manifest")
    try:
        return _manifest_paths(path, column)
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: a manifest must be UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise UsageError(f"{path}: cannot read the manifest ({error.strerror or error})") from error


def _manifest_paths(path: Path, column: str | None) -> list[str]:
    from ..errors import UsageError

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise UsageError(f"{path}: reading Parquet needs pyarrow (pip install \"rpn-cli[ray]\")") from error
        import pyarrow

        try:
            table = parquet.read_table(path)
        except pyarrow.ArrowException as error:
            raise UsageError(f"{path}: not a readable Parquet file ({str(error).splitlines()[0]})") from error
        name = column or ("path" if "path" in table.column_names else table.column_names[0])
        if name not in table.column_names:
            raise UsageError(f"{path}: no column {name!r} (columns: {', '.join(table.column_names)})")
        return [str(value) for value in table.column(name).to_pylist() if value]
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            names = reader.fieldnames or []
            name = column or ("path" if "path" in names else (names[0] if names else None))
            if name not in names:
                raise UsageError(f"{path}: no column {name!r} (columns: {', '.join(names)})")
            return [row[name] for row in reader if row.get(name)]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
