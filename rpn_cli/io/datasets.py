"""Training and evaluation data: COCO annotation files, Pascal VOC XML folders, unlabeled folders.

Everything becomes a list of :class:`AnnotatedImage`, boxes as (x1, y1, x2, y2)
in the original image's pixels.
"""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import IMAGE_SUFFIXES


@dataclass
class AnnotatedImage:
    """One image and its boxes. ``boxes``: (K, 4) float32; ``crowd``: (K,) bool; ``areas``: COCO's
    annotation area (mask area) when known, else box area; ``labelled``: False for folders without
    annotations (their boxes come from a teacher); ``categories``: for a partially labelled image, the
    COCO category ids its annotations cover completely (None: every object is annotated)."""

    path: Path
    width: int
    height: int
    image_id: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    areas: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float64))
    labelled: bool = True
    categories: frozenset[int] | None = None


def load_coco(annotation_file: str | Path, image_dir: str | Path | None = None, *,
              partial: bool = False) -> list[AnnotatedImage]:
    """Images and boxes of a COCO instances file; images are looked up in ``image_dir``
    (default: ``images/`` beside the file, or the file's folder). ``partial``: the file annotates only
    the categories it lists (every object of those, nothing of the others)."""
    annotation_file = Path(annotation_file)
    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{annotation_file}: not a readable COCO JSON file ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{annotation_file}: a COCO file needs 'images' and 'annotations' lists")
    if image_dir is None:
        image_dir = annotation_file.parent / "images"
        if not image_dir.is_dir():
            image_dir = annotation_file.parent
    image_dir = Path(image_dir)
    categories = None
    if partial:
        try:
            categories = frozenset(int(category["id"]) for category in data["categories"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{annotation_file}: a partially labelled COCO file needs its 'categories' "
                            f"with their ids ({error})") from error
        if not categories:
            raise DataError(f"{annotation_file}: a partially labelled COCO file needs at least one category")
    per_image: dict = {}
    for number, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"{annotation_file}: images[{number}] needs an 'id' and a 'file_name'")
        per_image[image["id"]] = []
    for number, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise DataError(f"{annotation_file}: annotations[{number}] is not an object")
        if annotation.get("image_id") in per_image:
            per_image[annotation["image_id"]].append((number, annotation))
    images = []
    for number, image in enumerate(data["images"]):
        rows, crowd, areas = [], [], []
        for index, annotation in per_image[image["id"]]:
            box = annotation.get("bbox")
            wrong = DataError(f"{annotation_file}: annotations[{index}] needs a 'bbox' of 4 numbers "
                              f"(x, y, width, height) and a numeric 'area', got {box!r}")
            if not isinstance(box, list) or len(box) != 4:
                raise wrong
            try:
                x, y, w, h = (float(value) for value in box)
                area = float(annotation.get("area", w * h))
            except (TypeError, ValueError) as error:
                raise wrong from error
            rows.append([x, y, x + w, y + h])
            crowd.append(bool(annotation.get("iscrowd", 0)))
            areas.append(area)
        try:
            width, height = int(image["width"]), int(image["height"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{annotation_file}: images[{number}] needs a whole-number 'width' and 'height'") from error
        images.append(AnnotatedImage(image_dir / image["file_name"], width, height, str(image["id"]),
                                     np.array(rows, np.float32).reshape(-1, 4), np.array(crowd, bool),
                                     np.array(areas, np.float64), categories=categories))
    return images


def load_voc(folder: str | Path) -> list[AnnotatedImage]:
    """A Pascal VOC folder (``Annotations/*.xml`` and ``JPEGImages/``). ``difficult`` objects are
    kept as crowd-like (ignored) boxes; VOC's 1-based pixel corners become 0-based."""
    folder = Path(folder)
    annotation_dir = folder / "Annotations"
    if not annotation_dir.is_dir():
        raise DataError(f"{folder}: a VOC folder needs an Annotations/ folder")
    images = []
    for xml_file in sorted(annotation_dir.glob("*.xml")):
        try:
            root = ElementTree.parse(xml_file).getroot()
            file_name = root.findtext("filename") or (xml_file.stem + ".jpg")
            width = int(float(root.findtext("size/width")))
            height = int(float(root.findtext("size/height")))
            rows, difficult = [], []
            for obj in root.iter("object"):
                box = obj.find("bndbox")
                x1, y1, x2, y2 = (float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
                rows.append([x1 - 1.0, y1 - 1.0, x2, y2])
                difficult.append(obj.findtext("difficult", "0").strip() == "1")
        except (ElementTree.ParseError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{xml_file}: not a valid VOC annotation ({error})") from error
        boxes = np.array(rows, np.float32).reshape(-1, 4)
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float64)
        images.append(AnnotatedImage(folder / "JPEGImages" / file_name, width, height, xml_file.stem,
                                     boxes, np.array(difficult, bool), areas))
    if not images:
        raise DataError(f"{folder}: no .xml files in Annotations/")
    return images


def load_unlabeled(folder: str | Path) -> list[AnnotatedImage]:
    """Every image in ``folder`` (recursively), without boxes; sizes are read from the file headers."""
    from PIL import Image

    folder = Path(folder)
    images = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, Image.DecompressionBombError):
            width = height = 0  # unreadable or too large: skipped with a warning when training reaches it
        images.append(AnnotatedImage(path, width, height, str(path.relative_to(folder)), labelled=False))
    if not images:
        raise DataError(f"{folder}: no images")
    return images


def load_dataset(source: str | Path) -> list[AnnotatedImage]:
    """A COCO JSON file, a VOC folder, or a folder of unlabeled images, told apart by what is on disk."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        return load_coco(source)
    if source.is_dir() and (source / "Annotations").is_dir():
        return load_voc(source)
    if source.is_dir():
        return load_unlabeled(source)
    raise DataError(f"{source}: expected a COCO .json file, a VOC folder or a folder of images")


def without_photos_of(images: list[AnnotatedImage], held_out: list[AnnotatedImage]) -> list[AnnotatedImage]:
    """``images`` less those whose file name is one of ``held_out``'s: the same photo may sit in two
    folders (COCO file names are the photo's id)."""
    names = {image.path.name for image in held_out}
    return [image for image in images if image.path.name not in names]


def split_validation(images: list[AnnotatedImage], count: int, seed: int) -> tuple[list, list]:
    """(train, validation): ``count`` fully labelled images chosen by ``seed`` go to validation."""
    labelled = [index for index, image in enumerate(images) if image.labelled and image.categories is None]
    if count > len(labelled):
        raise DataError(f"asked for {count} validation images but only {len(labelled)} are labelled")
    chosen = set(random.Random(seed).sample(labelled, count))
    train = [image for index, image in enumerate(images) if index not in chosen]
    validation = [image for index, image in enumerate(images) if index in chosen]
    return train, validation
