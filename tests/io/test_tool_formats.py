"""The formats other tools import, each read back the way that tool reads it."""

import json
import pickle

import numpy as np
import pytest
from conftest import SAMPLES

from rpn_cli import cli

SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))
IDS = {path.name: 100 + number for number, path in enumerate(SAMPLE_FILES)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, small_checkpoint):
    """One run writing every format, with image ids from an annotation file; and the JSON records."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("formats")
    images = []
    for path in SAMPLE_FILES:
        width, height = Image.open(path).size
        images.append({"id": IDS[path.name], "file_name": path.name, "width": width, "height": height})
    annotations = [{"id": n + 1, "image_id": image["id"], "category_id": 1, "area": 900.0, "iscrowd": 0,
                    "bbox": [10.0, 10.0, 30.0, 30.0]} for n, image in enumerate(images)]
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "categories": [{"id": 1, "name": "object"}]}))
    out = folder / "out"
    status = cli.app.run(["propose", *map(str, SAMPLE_FILES), "--out", str(out), "-c", str(small_checkpoint), "-q",
                          "--top-k", "20", "--image-ids", str(folder / "ann.json"),
                          "--format", "json,yolo,coco,coco-instances,labelstudio,detectron2"])
    assert status == 0
    records = {json.loads((out / f"{path.stem}.json").read_text())["image"]: json.loads(
        (out / f"{path.stem}.json").read_text()) for path in SAMPLE_FILES}
    return folder, out, records


def test_yolo_label_files_give_back_the_boxes(outputs):
    _, out, records = outputs
    for path in SAMPLE_FILES:
        record = records[str(path)]
        rows = np.loadtxt(out / f"{path.stem}.txt", ndmin=2)
        assert rows.shape == (len(record["boxes"]), 6) and (rows[:, 0] == 0).all()
        assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all()
        cx, cy, w, h = (rows[:, 1] * record["width"], rows[:, 2] * record["height"], rows[:, 3] * record["width"],
                        rows[:, 4] * record["height"])
        back = np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1)
        np.testing.assert_allclose(back, record["boxes"], atol=1e-3 * max(record["width"], record["height"]))
        np.testing.assert_allclose(rows[:, 5], record["scores"], atol=1e-6)


def test_coco_files_load_in_pycocotools_with_the_annotation_ids(outputs):
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    folder, out, records = outputs
    ground_truth = coco_module.COCO(str(folder / "ann.json"))
    results = ground_truth.loadRes(str(out / "proposals_coco.json"))  # rejects ids the dataset lacks
    assert sorted(results.getImgIds()) == sorted(IDS.values())
    evaluation = cocoeval.COCOeval(ground_truth, results, "bbox")
    evaluation.params.useCats = 0
    evaluation.evaluate()
    evaluation.accumulate()
    dataset = coco_module.COCO(str(out / "proposals_coco_instances.json"))
    assert sorted(dataset.getImgIds()) == sorted(IDS.values())
    for path in SAMPLE_FILES:
        record = records[str(path)]
        image_id = IDS[path.name]
        assert dataset.imgs[image_id]["file_name"] == str(path)
        annotations = dataset.loadAnns(dataset.getAnnIds(imgIds=[image_id]))
        assert [a["score"] for a in annotations] == record["scores"]
        for annotation, (x1, y1, x2, y2) in zip(annotations, record["boxes"]):
            np.testing.assert_allclose(annotation["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=0.011)


def test_label_studio_tasks_are_pre_annotations_in_percent(outputs):
    _, out, records = outputs
    tasks = json.loads((out / "proposals_labelstudio.json").read_text())
    assert [task["data"]["image"] for task in tasks] == [str(path) for path in SAMPLE_FILES]
    for task in tasks:
        record = records[task["data"]["image"]]
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("rpn-cli ") and prediction["score"] == record["scores"][0]
        assert len(prediction["result"]) == len(record["boxes"])
        for result, box, score in zip(prediction["result"], record["boxes"], record["scores"]):
            assert (result["type"], result["from_name"], result["to_name"]) == ("rectanglelabels", "label", "image")
            assert (result["original_width"], result["original_height"]) == (record["width"], record["height"])
            value = result["value"]
            assert value["rectanglelabels"] == ["object"] and result["score"] == score
            assert all(0 <= value[key] <= 100 for key in ("x", "y", "width", "height"))
            back = [value["x"] * record["width"] / 100, value["y"] * record["height"] / 100,
                    (value["x"] + value["width"]) * record["width"] / 100,
                    (value["y"] + value["height"]) * record["height"] / 100]
            np.testing.assert_allclose(back, box, atol=1e-6)


def _detectron2_load_proposals(dataset_dicts, proposal_file):
    """detectron2's ``load_proposals_into_dataset`` (data/build.py), re-implemented: the reader of
    ``DATASETS.PROPOSAL_FILES_*``."""
    with open(proposal_file, "rb") as handle:
        proposals = pickle.load(handle, encoding="latin1")
    for old, new in {"indexes": "ids", "scores": "objectness_logits"}.items():
        if old in proposals:
            proposals[new] = proposals.pop(old)
    image_ids = {str(record["image_id"]) for record in dataset_dicts}
    index_of = {str(image_id): i for i, image_id in enumerate(proposals["ids"]) if str(image_id) in image_ids}
    assert proposals.get("bbox_mode", 0) == 0  # BoxMode.XYXY_ABS
    for record in dataset_dicts:
        i = index_of[str(record["image_id"])]
        logits = proposals["objectness_logits"][i]
        order = logits.argsort()[::-1]
        record["proposal_boxes"] = proposals["boxes"][i][order]
        record["proposal_objectness_logits"] = logits[order]
    return dataset_dicts


def test_detectron2_reads_the_precomputed_proposals(outputs):
    folder, out, records = outputs
    dataset = [{"image_id": image_id, "file_name": name} for name, image_id in IDS.items()]
    loaded = _detectron2_load_proposals(dataset, out / "proposals_detectron2.pkl")
    for entry in loaded:
        record = records[str(SAMPLES / entry["file_name"])]
        assert entry["proposal_boxes"].dtype == np.float32 and entry["proposal_boxes"].shape == (20, 4)
        probabilities = 1 / (1 + np.exp(-entry["proposal_objectness_logits"].astype(np.float64)))
        # detectron2 re-sorts by logit (argsort reversed), which may swap boxes of equal score: compare
        # (score, box) rows ordered by box. After NMS no two boxes are equal, while scores (a random
        # checkpoint's, all near 0.5) may tie or fall either side of a rounding step.
        got = np.column_stack((probabilities, entry["proposal_boxes"]))
        want = np.column_stack((record["scores"], record["boxes"]))
        order = lambda rows: rows[np.lexsort(rows[:, 1:].T[::-1])]  # noqa: E731
        np.testing.assert_allclose(order(got), order(want), atol=1e-4)
        assert (np.diff(probabilities) <= 1e-9).all()  # best first


def test_default_ids_and_one_file_outputs(tmp_path, small_checkpoint, capsys):
    import shutil

    for name in ("b.jpg", "a.jpg"):
        shutil.copy(SAMPLE_FILES[0], tmp_path / name)
    out = tmp_path / "results.json"
    # Names that are no numbers: ids 1..N in input order, which pycocotools accepts.
    status = cli.app.run(["propose", str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg"), "--out", str(out), "--format",
                          "coco", "-c", str(small_checkpoint), "-q", "--top-k", "3"])
    assert status == 0
    assert sorted({r["image_id"] for r in json.loads(out.read_text())}) == [1, 2]
    array = tmp_path / "records.json"
    status = cli.app.run(["propose", str(tmp_path), "--out", str(array), "-c", str(small_checkpoint), "-q",
                          "--top-k", "3"])
    assert status == 0 and not array.is_dir()
    assert [r["image"] for r in json.loads(array.read_text())] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    capsys.readouterr()
    (tmp_path / "other.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "c.jpg"}]}))
    for arguments, code, message in (
            (["--out", str(tmp_path / "x.json"), "--format", "png"], 2, "is one file: give one --format"),
            (["--out", str(tmp_path / "x.json"), "--format", "detectron2"], 2, "writes a .pkl file"),
            # An annotation file that cannot be used: exit 5, as for rpn eval's.
            (["--out", str(tmp_path / "o"), "--format", "coco", "--image-ids", str(tmp_path / "none.json")], 5,
             "none.json: not a COCO file"),
            (["--out", str(tmp_path / "o"), "--format", "coco", "--image-ids", str(tmp_path / "other.json")], 5,
             f"{tmp_path / 'a.jpg'}: not among the images of {tmp_path / 'other.json'}"),
            (["--out", str(tmp_path / "o"), "--format", "coco", "--skip-existing"], 2, "--skip-existing resumes")):
        status = cli.app.run(["propose", str(tmp_path), "-c", str(small_checkpoint), *arguments])
        error = capsys.readouterr().err
        assert status == code and error.count("\n") == 1 and message in error, error
