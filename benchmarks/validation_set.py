"""Write the fixed validation set of the default checkpoint: a COCO file of fully annotated photos that no
checkpoint in its chain was trained on.

    python benchmarks/validation_set.py OUT.json [--checkpoint CKPT]

It holds the 50 ``coco-train2017`` photos named in the checkpoint's provenance (``validation_images``:
held out since the first default) and all 96 photos of ``coco-extra`` (new in this round, never trained
on): 146 photos. Image paths are written absolute, so the file can live anywhere; annotation ids are
renumbered (the two files' ids overlap). ``rpn train --validation-set OUT.json`` validates on it and
leaves these photos out of training.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli.io.checkpoint import read_spec  # noqa: E402
from rpn_cli.io.datasets import AnnotatedImage, load_coco  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def held_out_ids(checkpoint: Path) -> set[str]:
    return {str(i) for i in read_spec(checkpoint).provenance["validation_images"]}


def validation_images(checkpoint: Path = DEFAULT_CHECKPOINT) -> list[AnnotatedImage]:
    """The validation set as annotated images (what the file holds), read from ../shared/data."""
    held_out = held_out_ids(checkpoint)
    return ([image for image in load_coco(DATA / "coco-train2017" / "instances.json") if image.image_id in held_out]
            + load_coco(DATA / "coco-extra" / "instances.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = parser.parse_args()

    held_out = held_out_ids(args.checkpoint)
    parts = [(DATA / "coco-train2017", lambda image: str(image["id"]) in held_out),
             (DATA / "coco-extra", lambda image: True)]
    images, annotations, categories = [], [], {}
    for folder, wanted in parts:
        data = json.loads((folder / "instances.json").read_text())
        chosen = {image["id"]: image for image in data["images"] if wanted(image)}
        for image in chosen.values():
            images.append({**image, "file_name": str((folder / "images" / image["file_name"]).resolve())})
        for annotation in data["annotations"]:
            if annotation["image_id"] in chosen:
                annotations.append({**annotation, "id": len(annotations) + 1})
        categories.update({category["id"]: category for category in data["categories"]})
    if len({image["id"] for image in images}) != len(images):
        raise SystemExit("the two files share image ids: cannot merge them")
    args.out.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": sorted(categories.values(), key=lambda c: c["id"])}))
    print(f"{args.out}: {len(images)} photos, {len(annotations)} boxes", file=sys.stderr)


if __name__ == "__main__":
    main()
