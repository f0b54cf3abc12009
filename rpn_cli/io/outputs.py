"""Proposal records and the files they are written to: JSON Lines, JSON, PNG overlays, and the formats of
other tools (``tool_formats``)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path, PurePath
from typing import TextIO

from PIL import Image

from ..errors import OutputError, UsageError
from ..model.proposals import ImageProposals
from .files import atomic_write_bytes, check_writable_folder, check_writable_under
from .images import load_image
from .inputs import InputImage
from .results import ImageResult
from .tool_formats import (
    coco_instances,
    coco_results,
    detectron2_proposals,
    label_studio_tasks,
    yolo_lines,
)
from .visualize import contact_sheet, draw_proposals, thumbnail_with_proposals

# Formats written per image (a file beside each image's name in --out) and collected into one file.
PER_IMAGE_SUFFIXES = {"json": ".json", "png": ".png", "yolo": ".txt"}
COLLECTED_NAMES = {"coco": "proposals_coco.json", "coco-instances": "proposals_coco_instances.json",
                   "labelstudio": "proposals_labelstudio.json", "detectron2": "proposals_detectron2.pkl"}
OUTPUT_FORMATS = ("jsonl", *PER_IMAGE_SUFFIXES, *COLLECTED_NAMES)
SINGLE_FILE_SUFFIXES = (".json", ".pkl")


def proposal_record(image: str, proposals: ImageProposals) -> dict:
    """The JSON object of one image: boxes (x1, y1, x2, y2) in original pixels, scores high to low."""
    return {
        "image": image,
        "width": proposals.width,
        "height": proposals.height,
        "boxes": [[round(v, 2) for v in box] for box in proposals.boxes.tolist()],
        "scores": [round(v, 6) for v in proposals.scores.tolist()],
    }


def parse_formats(text: str) -> list[str]:
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in OUTPUT_FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {text}: choose from {', '.join(OUTPUT_FORMATS)} (comma-separated)")
    return formats


def output_stem(relative: str) -> str:
    """``sub/photo.jpg`` -> ``sub/photo``: where an image's ``.json`` / ``.png`` go inside ``--out``."""
    path = PurePath(relative)
    return str(path.with_suffix("")) if path.suffix else str(path)


def check_output_names(items: list[InputImage]) -> None:
    """Two inputs that would write the same output file are a usage error, found before any work."""
    seen: dict[str, str] = {}
    for item in items:
        stem = output_stem(item.relative)
        if stem in seen and seen[stem] != item.given:
            raise UsageError(f"{item.given} and {seen[stem]} would both write {stem}.json/.png; give them distinct names")
        seen[stem] = item.given


def check_output_paths(out_dir: Path, items: list[InputImage], formats: list[str]) -> None:
    """Before any work: no output may replace an input, and none is written through a symbolic link
    to a folder inside ``out_dir`` (it would land outside it). Raises :class:`UsageError` naming the clash."""
    inputs = {os.path.realpath(item.given): item.given for item in items if not item.problem}
    checked: set[Path] = set()
    for item in items:
        for path in image_outputs(out_dir, item.relative, formats):
            folder = out_dir
            for part in path.relative_to(out_dir).parts[:-1]:
                folder = folder / part
                if folder not in checked and folder.is_symlink():
                    raise UsageError(f"{folder}: a symbolic link inside --out; rpn does not write through it "
                                     "(remove it or choose another --out)")
                checked.add(folder)
            clash = inputs.get(os.path.realpath(path))
            if clash is not None:
                raise UsageError(f"{path} would replace the input {clash}; choose another --out")


# What atomic_write_bytes leaves when a run is killed mid-write: ".NAME.<8 random>.tmp".
_STALE_TEMPORARY = re.compile(r"\..+\.(json|png|txt)\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files an earlier killed run of ours left in ``out_dir`` (not following
    links); returns how many. Only for a resumed run: a run writing now would lose its files."""
    removed = 0
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if _STALE_TEMPORARY.fullmatch(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def output_plan(out: Path, formats: list[str]) -> tuple[list[str], dict[str, Path]]:
    """(per-image formats, {collected format: its file}) for ``--out OUT``. OUT is a folder, or one
    file (``.json``, ``.pkl``) when a single format writes one file: ``json`` then holds one array.
    Refused before any image is read: an OUT that no file can be written under."""
    check_writable_under(out)
    if out.suffix.lower() in SINGLE_FILE_SUFFIXES and not out.is_dir():
        if len(formats) != 1 or formats[0] not in ("json", *COLLECTED_NAMES):
            raise UsageError(f"--out {out} is one file: give one --format that writes one file "
                             f"(json, {', '.join(COLLECTED_NAMES)}), or a folder")
        wanted = ".pkl" if formats[0] == "detectron2" else ".json"
        if out.suffix.lower() != wanted:
            raise UsageError(f"--out {out}: --format {formats[0]} writes a {wanted} file")
        return [], {formats[0]: out}
    check_writable_folder(out, f"--format {','.join(formats)} writes")
    return ([f for f in formats if f in PER_IMAGE_SUFFIXES],
            {f: out / COLLECTED_NAMES[f] for f in formats if f in COLLECTED_NAMES})


def image_outputs(out_dir: Path, relative: str, formats: list[str]) -> list[Path]:
    stem = output_stem(relative)
    return [out_dir / f"{stem}{PER_IMAGE_SUFFIXES[fmt]}" for fmt in formats if fmt in PER_IMAGE_SUFFIXES]


def write_image_outputs(out_dir: Path, result: ImageResult, formats: list[str], draw_top: int,
                        record: dict | None = None) -> None:
    """Write the per-image files of one result, each atomically (``record``: its
    :func:`proposal_record`, when the caller has it already)."""
    record = record or proposal_record(result.item.given, result.proposals)
    for path in image_outputs(out_dir, result.item.relative, formats):
        if path.suffix == ".png":
            overlay = draw_proposals(load_image(result.item.given, None), result.proposals, draw_top)
            atomic_write_bytes(path, lambda tmp: overlay.save(tmp, format="PNG"))
            continue
        text = json.dumps(record) + "\n" if path.suffix == ".json" else yolo_lines(record)
        atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def write_collected(path: Path, fmt: str, records: list[dict], ids: dict[str, int], model_version: str) -> None:
    """One file holding every record in ``fmt`` (json: an array of the records themselves)."""
    if fmt == "detectron2":
        content = pickle.dumps(detectron2_proposals(records, ids), protocol=4)
        atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(content))
        return
    data = {"json": lambda: records, "coco": lambda: coco_results(records, ids),
            "coco-instances": lambda: coco_instances(records, ids),
            "labelstudio": lambda: label_studio_tasks(records, model_version)}[fmt]()
    text = json.dumps(data)
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write_bytes(path, lambda tmp: image.save(tmp, format="PNG"))


# A contact sheet's thumbnails: how many, and their size in pixels.
SHEET_IMAGES, SHEET_TILE = 60, 200


def pending_items(items: list[InputImage], out_dir: Path, formats: list[str]) -> tuple[list[InputImage], int]:
    """(the items whose per-image outputs in ``out_dir`` are not all there yet, how many were), after
    sweeping the temporaries an interrupted run left: what ``--skip-existing`` resumes."""
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir)
    if not formats:
        return items, 0
    remaining = [item for item in items
                 if not all(path.exists() for path in image_outputs(out_dir, item.relative, formats))]
    return remaining, len(items) - len(remaining)


class ProposalWriter:
    """Where the records of a run go, one :meth:`write` per image: JSON Lines to ``stream``, per-image
    files in ``out``, and at :meth:`finish` the files that collect every record and the contact sheet.

    ``formats``: as :func:`parse_formats` gives them; ``image_ids``: COCO ids by given path (collected
    formats); ``sheet``: a PNG of the first :data:`SHEET_IMAGES` images with their best ``draw_top`` boxes.
    A closed ``stream`` raises ``BrokenPipeError`` (the caller decides what that means); any other
    failure to write is an :class:`OutputError`.
    """

    def __init__(self, *, formats: list[str], out: Path | None = None, stream: TextIO | None = None,
                 draw_top: int = 10, image_ids: dict[str, int] | None = None, model_version: str = "",
                 sheet: Path | None = None):
        self.formats, self.out, self.stream, self.draw_top = formats, out, stream, draw_top
        self.per_image, self.collected = output_plan(out, formats) if out is not None else ([], {})
        self.image_ids, self.model_version, self.sheet = image_ids or {}, model_version, sheet
        self.records: list[dict] = []
        self.tiles: list[tuple[Image.Image, str]] = []

    def write(self, result: ImageResult) -> None:
        record = proposal_record(result.item.given, result.proposals)
        if "jsonl" in self.formats and self.stream is not None:
            try:
                self.stream.write(json.dumps(record) + "\n")
                self.stream.flush()
            except BrokenPipeError:
                raise
            except OSError as error:
                raise OutputError(f"standard output: cannot write ({error.strerror or error})") from error
        if self.per_image:
            write_image_outputs(self.out, result, self.per_image, self.draw_top, record)
        if self.collected:
            self.records.append(record)
        if self.sheet is not None and len(self.tiles) < SHEET_IMAGES:
            image = load_image(result.item.given, None)
            self.tiles.append((thumbnail_with_proposals(image, result.proposals, self.draw_top, SHEET_TILE),
                               result.item.relative))

    def finish(self, complete: bool = True) -> None:
        """Write the collected files and the contact sheet (each atomically); a run that stopped early
        (``complete`` False) writes only the sheet: a collected file would hold part of the images."""
        if complete:
            for fmt, target in self.collected.items():
                write_collected(target, fmt, self.records, self.image_ids, self.model_version)
        if self.sheet is not None and self.tiles:
            save_png(contact_sheet(self.tiles, SHEET_TILE), self.sheet)
