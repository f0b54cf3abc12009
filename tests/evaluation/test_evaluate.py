"""Average recall against pycocotools' COCOeval (useCats = 0) on the real COCO annotations."""

import contextlib
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rpn_cli import cli
from rpn_cli.evaluation.recall import average_recall_report, recall_table
from rpn_cli.io.datasets import load_coco

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools is in the test extra")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

MAX_DETS = [10, 100, 300, 1000]


def _fake_proposals(images, seed):
    """Jittered copies of the true boxes (some near, some far) plus random boxes, with random scores."""
    rng = np.random.default_rng(seed)
    found = {}
    for image in images:
        boxes = [np.zeros((0, 4))]
        for _ in range(3):
            jitter = image.boxes + rng.normal(0, 1, image.boxes.shape) * np.tile(
                np.maximum(image.boxes[:, 2:] - image.boxes[:, :2], 1), 2) * rng.uniform(0.02, 0.3)
            boxes.append(jitter)
        xy = rng.uniform(0, [image.width, image.height], (400, 2))
        wh = rng.uniform(4, [image.width / 2, image.height / 2], (400, 2))
        boxes.append(np.concatenate((xy, xy + wh), 1))
        stacked = np.concatenate(boxes)
        stacked[:, 0::2] = stacked[:, 0::2].clip(0, image.width)
        stacked[:, 1::2] = stacked[:, 1::2].clip(0, image.height)
        stacked[:, 2:] = np.maximum(stacked[:, 2:], stacked[:, :2] + 0.5)
        scores = rng.random(len(stacked))
        scores[: len(stacked) // 10] = 0.5  # ties, which COCOeval breaks by input order
        found[image.image_id] = (stacked, scores)
    return found


def _cocoeval_recall(annotation_file, images, proposals):
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        results = []
        for image in images:
            boxes, scores = proposals[image.image_id]
            for (x1, y1, x2, y2), score in zip(boxes.tolist(), scores.tolist()):
                results.append({"image_id": int(image.image_id), "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        detections = ground_truth.loadRes(results)
        evaluator = COCOeval(ground_truth, detections, "bbox")
        evaluator.params.imgIds = [int(image.image_id) for image in images]
        evaluator.params.useCats = 0
        evaluator.params.maxDets = MAX_DETS
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["recall"][:, 0, :, :]  # (T, areas all/small/medium/large, maxDets)


def test_recall_equals_cocoeval_on_real_annotations(coco_dir):
    images = load_coco(coco_dir / "instances.json")[:60]
    proposals = _fake_proposals(images, seed=0)
    expected = _cocoeval_recall(coco_dir / "instances.json", images, proposals)
    for area_index, area in enumerate(("all", "small", "medium", "large")):
        ours = recall_table(images, proposals, MAX_DETS, area)
        np.testing.assert_allclose(ours, expected[:, area_index, :], atol=1e-4, err_msg=area)
    report = average_recall_report(images, proposals, MAX_DETS)
    assert report["AR@100"] == pytest.approx(expected[:, 0, 1].mean(), abs=1e-4)
    assert report["R@0.5@1000"] == pytest.approx(expected[0, 0, 3], abs=1e-4)
    assert report["AR@100_small"] == pytest.approx(expected[:, 1, 1].mean(), abs=1e-4)
    assert 0.05 < report["AR@100"] < 0.95  # the fake proposals are neither useless nor perfect


def test_eval_command_on_a_proposals_file(coco_dir, tmp_path):
    images = load_coco(coco_dir / "instances.json")[:20]
    proposals = _fake_proposals(images, seed=1)
    lines = []
    for image in images:
        boxes, scores = proposals[image.image_id]
        order = np.argsort(-scores, kind="mergesort")
        lines.append(json.dumps({"image": str(image.path), "width": image.width, "height": image.height,
                                 "boxes": boxes[order].tolist(), "scores": scores[order].tolist()}))
    jsonl = tmp_path / "proposals.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    plot = tmp_path / "recall.png"
    result = CliRunner().invoke(cli.app, ["eval", str(coco_dir / "instances.json"), "--proposals", str(jsonl),
                                          "--limit", "20", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = _cocoeval_recall(coco_dir / "instances.json", images, proposals)
    assert report["AR@300"] == pytest.approx(expected[:, 0, 2].mean(), abs=1e-4)
    assert plot.stat().st_size > 1000


def test_eval_takes_the_proposal_layers_options_as_propose_does(tmp_path, default_checkpoint):
    """The "ground truth" is the shipped checkpoint's own best 20 boxes without voting: evaluated with
    --vote-iou 0 they are found exactly (recall 1 up to IoU 0.95); with the checkpoint's voting they move."""
    from conftest import SAMPLES, run_rpn

    photos = [SAMPLES / name for name in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    common = ["-c", default_checkpoint, "--backend", "torch", "--precision", "float32", "-q"]
    records = [json.loads(line) for line in run_rpn("propose", *photos, *common, "--vote-iou", "0", "--top-k", "20",
                                                      check=True).stdout.splitlines()]
    images, annotations = [], []
    for number, (photo, record) in enumerate(zip(photos, records), 1):
        images.append({"id": number, "file_name": photo.name, "width": record["width"], "height": record["height"]})
        for x1, y1, x2, y2 in record["boxes"]:
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 1, "iscrowd": 0,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    (tmp_path / "own.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": [{"id": 1, "name": "object"}]}))
    evaluate = ["eval", tmp_path / "own.json", "--images", SAMPLES, *common, "--json"]
    without_voting = json.loads(run_rpn(*evaluate, "--vote-iou", "0", check=True).stdout)
    assert without_voting["boxes"] == 60 and without_voting["AR@100"] == pytest.approx(1.0)
    with_voting = json.loads(run_rpn(*evaluate, check=True).stdout)
    assert with_voting["AR@100"] < 0.99
    fewer = json.loads(run_rpn(*evaluate, "--vote-iou", "0", "--nms-iou", "0.3", check=True).stdout)
    assert fewer["AR@100"] < 0.99  # boxes the 0.7 NMS kept are now suppressed
    refused = run_rpn("eval", tmp_path / "own.json", "--proposals", tmp_path / "none.jsonl", "--vote-iou", "0")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error: --vote-iou: the proposal layer's options apply when running a checkpoint, "
                                      "not to a --proposals file")
