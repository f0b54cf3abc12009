"""Fit a checkpoint's level offsets (the proposal layer's ``level_offsets``) on fully annotated photos.

    python benchmarks/fit_level_offsets.py CKPT FIT.json [--exclude VAL.json] [--values=-1,-0.75,...,0.5]
        [--network MODEL.onnx] [--validation VAL.json] [--out NEW.safetensors]

Each pyramid level's scores come from one shared head, but the levels compete for the same 300 places:
an offset added to one level's objectness log-odds re-ranks its boxes against the others'. The network
runs once a photo; then every combination of ``--values`` for the levels after the first (the first stays
0: only differences between levels change the ranking) goes through the proposal layer, and the one with
the highest AR@100 + AR@300 on FIT.json's photos wins (less any whose file name is in ``--exclude``:
fit on training photos, never on the validation set). ``--validation`` reports it on other photos;
``--out`` writes the checkpoint with the offsets in its proposal layer and the fit in its provenance
(``after_training``), weights unchanged. The network is CKPT's as ``rpn eval --backend torch --precision
float32`` runs it on the CPU, or ``--network``: an export of it, such as its int8 model (what ``auto`` runs
on CPUs). A written copy is a new file: its int8 model, if wanted, is made anew (``rpn export``).
"""

import argparse
import itertools
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli.evaluation.recall import average_recall_report  # noqa: E402
from rpn_cli.inference.predict import proposals_from_outputs, run_model  # noqa: E402
from rpn_cli.inference.runtime import load_model  # noqa: E402
from rpn_cli.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from rpn_cli.io.datasets import load_coco  # noqa: E402
from rpn_cli.io.images import load_image  # noqa: E402
from rpn_cli.model.preprocess import prepare_image  # noqa: E402
from rpn_cli.model.proposals import MAX_LEVEL_OFFSET  # noqa: E402

DEFAULT_VALUES = "-1,-0.75,-0.5,-0.25,0,0.25,0.5"
FIGURES = ("AR@10", "AR@100", "AR@300", "AR@100_small", "AR@100_medium", "AR@100_large")


def fully_annotated(annotations: Path, exclude: Path | None = None) -> list:
    """The fully annotated photos of a COCO file, less those whose file name ``exclude`` holds."""
    excluded = set()
    if exclude is not None:
        excluded = {Path(image["file_name"]).name for image in json.loads(exclude.read_text())["images"]}
    return [image for image in load_coco(annotations)
            if image.labelled and image.categories is None and image.path.name not in excluded]


def network_outputs(model, images) -> list:
    """(annotated image, prepared image, per-level outputs) of each photo: the network runs once."""
    outputs = []
    for image in images:
        prepared = prepare_image(load_image(image.path), model.spec.preprocess)
        outputs.append((image, prepared, run_model(model, [prepared])))
    return outputs


def recall(outputs, layer) -> dict:
    """The evaluation's figures of ``layer`` on cached network outputs."""
    found = {}
    for image, prepared, levels in outputs:
        proposals = proposals_from_outputs(levels, [prepared], layer)[0]
        found[image.image_id] = (proposals.boxes.numpy(), proposals.scores.numpy())
    return average_recall_report([image for image, _, _ in outputs], found, (10, 100, 300))  # as rpn train's


def with_offsets(layer, offsets: tuple):
    """``layer`` with these level offsets (() for none)."""
    return replace(layer, settings=replace(layer.settings, level_offsets=offsets))


def shown(offsets: tuple) -> str:
    return ",".join(f"{value:g}" for value in offsets) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("fit", type=Path, help="A COCO file of fully annotated photos to fit on.")
    parser.add_argument("--exclude", type=Path,
                        help="A COCO file whose photos (by file name) are left out of the fit.")
    parser.add_argument("--values", default=DEFAULT_VALUES,
                        help=f"Offsets tried at each level, as --values={DEFAULT_VALUES} (the default).")
    parser.add_argument("--network", type=Path,
                        help="Run this export of CKPT (e.g. its .int8.onnx) instead of CKPT in PyTorch float32.")
    parser.add_argument("--validation", type=Path, help="A COCO file to report the chosen offsets on.")
    parser.add_argument("--out", type=Path, help="Write the checkpoint with the chosen offsets here.")
    args = parser.parse_args()
    if args.out is not None and args.out.exists():
        parser.error(f"{args.out} exists; choose a new file")
    try:
        values = sorted({float(value) for value in args.values.split(",")})
    except ValueError:
        values = []
    if not values or not all(abs(value) <= MAX_LEVEL_OFFSET for value in values):
        parser.error(f"--values {args.values}: expected comma-separated numbers from -{MAX_LEVEL_OFFSET:g} to "
                     f"{MAX_LEVEL_OFFSET:g}")

    torch.set_grad_enabled(False)
    model = load_checkpoint(args.checkpoint, "cpu").eval()  # what is written back, BatchNorm unfolded
    network = load_model(args.network or args.checkpoint, "cpu", "float32", backend=None if args.network else "torch")
    if network.spec.preprocess != model.spec.preprocess or len(network.spec.levels) != len(model.spec.levels):
        parser.error(f"--network {args.network}: not an export of {args.checkpoint}")
    images = fully_annotated(args.fit, args.exclude)
    if not images:
        parser.error(f"{args.fit}: no fully annotated photos left to fit on")
    outputs = network_outputs(network, images)
    layer = model.spec.proposal_layer()
    before = layer.settings.level_offsets
    count = len(outputs[0][2])
    print(f"{(args.network or args.checkpoint).name}: {count} levels, fit on {len(images)} photos of {args.fit.name}",
          flush=True)
    results = []
    for rest in itertools.product(values, repeat=count - 1):
        offsets = (0.0, *rest)
        figures = recall(outputs, with_offsets(layer, offsets))
        results.append((figures["AR@100"] + figures["AR@300"], offsets, figures))
    base = recall(outputs, with_offsets(layer, ()))
    print("| offsets | " + " | ".join(FIGURES) + " |\n|---|" + "---|" * len(FIGURES))
    print("| none | " + " | ".join(f"{base[key]:.4f}" for key in FIGURES) + " |")
    for _, offsets, figures in sorted(results, key=lambda row: -row[0])[:10]:
        print(f"| {shown(offsets)} | " + " | ".join(f"{figures[key]:.4f}" for key in FIGURES) + " |")
    _, best, fitted = max(results, key=lambda row: row[0])
    print(f"chosen: {shown(best)} (AR@100 {fitted['AR@100'] - base['AR@100']:+.4f}, "
          f"AR@300 {fitted['AR@300'] - base['AR@300']:+.4f} on the fit photos)", flush=True)

    validation = None
    if args.validation is not None:
        held_out = network_outputs(network, fully_annotated(args.validation))
        without = recall(held_out, with_offsets(layer, ()))
        validation = recall(held_out, with_offsets(layer, best))
        for name, figures in (("without", without), ("with", validation)):
            print(f"validation, {name} offsets: " + ", ".join(f"{key} {figures[key]:.4f}" for key in FIGURES))
    if args.out is not None:
        model.spec.proposals = replace(model.spec.proposals, level_offsets=best)
        fit = {"change": f"proposal layer: level offsets {shown(best)} (before: {shown(before)})",
               "network": args.network.name if args.network else "this checkpoint, PyTorch float32",
               "command": shlex.join(["python", "benchmarks/fit_level_offsets.py", *sys.argv[1:]]),
               "fitted_on": {"file": str(args.fit), "photos": len(images), "AR@100": fitted["AR@100"],
                             "AR@300": fitted["AR@300"], "without_offsets": {"AR@100": base["AR@100"],
                                                                             "AR@300": base["AR@300"]}}}
        if validation is not None:
            fit["validation"] = validation
        previous = model.spec.provenance.get("after_training")
        if previous is not None:
            fit["previous"] = previous
        model.spec.provenance["after_training"] = fit
        save_checkpoint(model, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
