"""The shipped checkpoint: it loads, it is what rpn_cli/weights/README.md says, and it finds obvious objects."""

import json

import pytest
import torch
from conftest import ROOT, SAMPLES
from torchvision.ops import box_iou
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.inference.predict import proposals_for_batch
from rpn_cli.io.checkpoint import load_checkpoint
from rpn_cli.io.images import load_image
from rpn_cli.model.preprocess import prepare_image

# Boxes drawn by hand on the samples, (x1, y1, x2, y2) in their pixels.
HAND_MADE = {
    "astronaut.jpg": [25.0, 15.0, 370.0, 512.0],  # the astronaut, from hair to the bottom edge
    "coffee.jpg": [75.0, 15.0, 480.0, 390.0],  # the cup on its saucer (with the spoon)
}


def test_it_loads_with_its_provenance(default_checkpoint):
    model = load_checkpoint(default_checkpoint)
    provenance = model.spec.provenance
    assert provenance["trained_by"] == "rpn train" and provenance["command"].startswith("rpn train")
    assert default_checkpoint.stat().st_size < 40 * 1024 * 1024
    readme = (ROOT / "rpn_cli" / "weights" / "README.md").read_text()
    assert default_checkpoint.name in readme and provenance["command"] in readme
    # The figures rpn_cli/weights/README.md gives for the shipped file are the ones recorded in it: its
    # training run's last validation, of the moving average of the weights that the file holds, with the
    # box voting it inherited from the eighth stage.
    assert model.spec.proposals.min_size == 8.0 and model.spec.proposals.vote_iou == 0.7
    assert provenance["config"]["ema_decay"] == 0.9995
    # The tenth stage's weights, with level offsets fitted after training on training photos; the fit's
    # command and its validation figures are in the file and in the README.
    assert model.spec.proposals.level_offsets == (0.0, 0.0, -0.75)
    fit = provenance["after_training"]
    assert fit["command"] in readme and fit["fitted_on"]["photos"] == 238
    trained, last_step = provenance["validation"], provenance["history"][-1]["validation_last_step"]
    shipped = fit["validation"]
    for label, figures in (("**shipped**: the tenth stage with level offsets 0, 0, -0.75", shipped),
                           ("tenth stage, epoch 2, the weight average: the default before this one", trained),
                           ("tenth stage, epoch 2, the last step's weights", last_step)):
        assert (f"| {label} | {figures['AR@10']:.3f} | {figures['AR@100']:.3f} | {figures['AR@300']:.3f} | "
                f"{figures['R@0.5@300']:.3f} | {figures['R@0.7@300']:.3f} |") in readme
    assert trained["images"] == shipped["images"] == 146 and len(provenance["validation_images"]) == 146
    # Better than the previous default (the tenth stage's weights without offsets) on the same photos.
    assert shipped["AR@100"] > trained["AR@100"] and shipped["AR@300"] > trained["AR@300"]
    assert provenance["partially_labelled_data"] and "val2017" in provenance["partially_labelled_data"][0]
    assert "do not score it on COCO val2017" in readme
    # It records what it was trained from, back to the first stage.
    earlier = provenance["initialised_from"]
    while earlier:
        assert earlier["command"] in readme
        earlier = earlier.get("initialised_from")


def test_info_summarises_its_provenance_a_line_an_entry(default_checkpoint):
    provenance = load_checkpoint(default_checkpoint).spec.provenance
    lines = CliRunner().invoke(cli.app, ["info", str(default_checkpoint)]).stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("provenance"))
    entries = lines[start:start + len(provenance)]
    assert [line[13:].split(":")[0] for line in entries] == list(provenance)
    assert entries[0] == f"provenance   after_training: {provenance['after_training']['change']} (5 entries)"
    assert f"             command: {provenance['command']}" in entries  # text whole
    assert f"             history: {len(provenance['history'])} items" in entries  # records counted
    assert f"             validation_images: {len(provenance['validation_images'])} items" in entries
    assert f"AR@100 {provenance['validation']['AR@100']:.4g}, " in next(e for e in entries if "validation: " in e)
    assert lines[start + len(provenance)].strip() == "(rpn info --json prints all of it)"
    assert max(len(line) for line in lines) < 1000  # the whole history was one 13,000-character line


@pytest.mark.parametrize("sample", sorted(HAND_MADE))
def test_best_proposals_cover_the_obvious_object(default_checkpoint, sample):
    model = load_checkpoint(default_checkpoint)
    prepared = prepare_image(load_image(SAMPLES / sample), model.spec.preprocess)
    result = proposals_for_batch(model, [prepared], model.spec.proposal_layer())[0]
    overlap = box_iou(torch.tensor([HAND_MADE[sample]]), result.boxes[:10])[0]
    assert float(overlap.max()) >= 0.7, overlap


def test_eval_runs_the_checkpoint(default_checkpoint, coco_dir):
    result = CliRunner().invoke(cli.app, ["eval", str(coco_dir / "instances.json"), "--limit", "8", "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 8 and 0.0 < report["AR@100"] <= report["AR@300"] <= report["AR@1000"] <= 1.0
