"""Targets, losses, data loading (COCO and VOC), the teacher, and short training runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rpn_cli.errors import DataError
from rpn_cli.io.datasets import load_coco, load_dataset, load_voc, split_validation
from rpn_cli.model.network import RegionProposalNetwork
from rpn_cli.model.preprocess import to_tensor
from rpn_cli.model.spec import default_mobilenet_spec
from rpn_cli.training.loop import TrainConfig, train
from rpn_cli.training.targets import (
    IGNORE,
    NEGATIVE,
    POSITIVE,
    TargetSettings,
    label_anchors,
    rpn_losses,
    sample_labels,
)

SETTINGS = TargetSettings()


def test_a_box_exactly_on_an_anchor_makes_it_positive():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 0.0, 64.0, 32.0], [8.0, 0.0, 40.0, 32.0]])
    labels, matched = label_anchors(anchors, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 64, 64, SETTINGS)
    # IoU 1, 0 and 0.6: positive, negative, ignored (between 0.3 and 0.7).
    assert labels.tolist() == [POSITIVE, NEGATIVE, IGNORE]
    assert matched[0].tolist() == [0.0, 0.0, 32.0, 32.0]


def test_a_box_no_anchor_reaches_07_with_still_gets_its_best_anchor():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0], [40.0, 40.0, 60.0, 60.0]])
    box = torch.tensor([[10.0, 10.0, 38.0, 38.0]])
    labels, matched = label_anchors(anchors, box, 64, 64, SETTINGS)
    # Anchors 0 and 1 tie at the box's best IoU (< 0.7): both positive.
    assert labels.tolist() == [POSITIVE, POSITIVE, NEGATIVE]
    assert matched[1].tolist() == box[0].tolist()


def test_border_anchors_are_left_out():
    anchors = torch.tensor([[-8.0, 0.0, 24.0, 32.0], [0.0, 0.0, 32.0, 32.0], [40.0, 40.0, 72.0, 72.0]])
    labels, _ = label_anchors(anchors, torch.tensor([[-8.0, 0.0, 24.0, 32.0]]), 64, 64, SETTINGS)
    assert labels[0] == IGNORE and labels[2] == IGNORE
    assert labels[1] == POSITIVE  # the box's best anchor among those inside


def test_an_image_without_boxes_has_only_negatives():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [50.0, 50.0, 90.0, 90.0]])
    labels, _ = label_anchors(anchors, torch.zeros((0, 4)), 64, 64, SETTINGS)
    assert labels.tolist() == [NEGATIVE, IGNORE]


def test_negatives_on_an_ignore_region_are_ignored():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 0.0, 96.0, 32.0], [64.0, 64.0, 96.0, 96.0],
                            [66.0, 2.0, 98.0, 34.0]])
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    unknown = torch.tensor([[64.0, 0.0, 96.0, 32.0]])
    labels, _ = label_anchors(anchors, boxes, 128, 128, SETTINGS, unknown)
    # The positive stays positive; the anchor on the unknown region (IoU 1) and its neighbour (IoU 0.78)
    # are ignored; the one away from it (IoU 0) stays negative.
    assert labels.tolist() == [POSITIVE, IGNORE, NEGATIVE, IGNORE]
    labels, _ = label_anchors(anchors, torch.zeros((0, 4)), 128, 128, SETTINGS, unknown)
    assert labels.tolist() == [NEGATIVE, IGNORE, NEGATIVE, IGNORE]


def test_partial_labels_merge_human_and_teacher_boxes():
    from rpn_cli.training.teacher import partial_label_targets

    person, dog = 1, 18
    humans = np.array([[10, 10, 50, 90], [100, 10, 140, 90]], np.float32)
    teacher = np.array([
        [12, 11, 49, 92],      # a person the humans boxed: gives way to theirs
        [200, 10, 240, 90],    # a person the humans left out: a person-only file is complete, so not kept
        [300, 100, 380, 160],  # a dog: kept (no human labels dogs here)
        [101, 12, 141, 88],    # the second person, taken for a dog: overlaps a human box, dropped
        [400, 10, 440, 60],    # a less sure dog: neither object nor background
        [500, 10, 540, 60],    # a dog below the ignore threshold: background
    ], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.15, 0.05], np.float32)
    categories = np.array([person, person, dog, dog, dog, dog])
    boxes, confidence, ignore = partial_label_targets(humans, frozenset({person}), teacher, scores, categories,
                                                      threshold=0.2, ignore_threshold=0.1)
    np.testing.assert_array_equal(boxes, np.array([[10, 10, 50, 90], [100, 10, 140, 90], [300, 100, 380, 160]],
                                                  np.float32))
    np.testing.assert_array_equal(confidence, np.array([1.0, 1.0, 0.7], np.float32))  # humans sure, the dog 0.7
    np.testing.assert_array_equal(ignore, np.array([[400, 10, 440, 60]], np.float32))
    # An unlabeled photo (no category is complete): every confident teacher box is an object.
    boxes, confidence, ignore = partial_label_targets(np.zeros((0, 4), np.float32), frozenset(), teacher, scores,
                                                      categories, threshold=0.2, ignore_threshold=0.1)
    assert len(boxes) == 4 and len(ignore) == 1
    np.testing.assert_array_equal(confidence, scores[:4])


def test_soft_targets_train_a_teacher_box_towards_its_objectness():
    from rpn_cli.model.network import LevelOutput

    # Two boxes, each exactly on one anchor: a human box (confidence 1) and a teacher box (0.6).
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 64.0, 96.0, 96.0], [0.0, 64.0, 32.0, 96.0]])
    boxes = [anchors[:2].clone()]
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    level = LevelOutput(logits, torch.zeros((1, 3, 4)), anchors, 1, 3)

    def objectness(confidence):
        return float(rpn_losses([level], boxes, [(128, 128)], "sigmoid", (1.0, 1.0, 1.0, 1.0), 4.0, SETTINGS,
                                torch.Generator().manual_seed(0), images_confidence=confidence)["objectness"])

    def bce(logit, target):  # written out, not torch's
        p = 1 / (1 + np.exp(-logit))
        return -(target * np.log(p) + (1 - target) * np.log(1 - p))

    soft = (bce(0.5, 1.0) + bce(-1.0, 0.6) + bce(2.0, 0.0)) / 3
    hard = (bce(0.5, 1.0) + bce(-1.0, 1.0) + bce(2.0, 0.0)) / 3
    assert objectness([torch.tensor([1.0, 0.6])]) == pytest.approx(soft, rel=1e-6)
    assert objectness(None) == pytest.approx(hard, rel=1e-6)
    assert objectness([torch.ones(2)]) == pytest.approx(hard, rel=1e-6)


def test_confidence_weights_scale_both_losses_of_an_anchor_on_a_teacher_box():
    from rpn_cli.model.network import LevelOutput

    # Anchor 0 sits on a human box (weight 1), anchor 1 on a teacher box (weight 0.6), anchor 2 is
    # background; the deltas miss both boxes by a known amount.
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 64.0, 96.0, 96.0], [0.0, 64.0, 32.0, 96.0]])
    boxes = [anchors[:2].clone()]
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    deltas = torch.tensor([[[0.3, 0.0, 0.0, 0.0], [0.0, -0.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    level = LevelOutput(logits, deltas, anchors, 1, 3)

    def losses(weight):
        return rpn_losses([level], boxes, [(128, 128)], "sigmoid", (1.0, 1.0, 1.0, 1.0), 4.0, SETTINGS,
                          torch.Generator().manual_seed(0), images_weight=weight)

    def bce(logit, target):  # written out, not torch's
        p = 1 / (1 + np.exp(-logit))
        return -(target * np.log(p) + (1 - target) * np.log(1 - p))

    def smooth_l1(x, beta=1 / 9):
        return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta

    weighted = losses([torch.tensor([1.0, 0.6])])
    assert float(weighted["objectness"]) == pytest.approx(
        (bce(0.5, 1.0) + 0.6 * bce(-1.0, 1.0) + bce(2.0, 0.0)) / 3, rel=1e-6)
    assert float(weighted["box"]) == pytest.approx((smooth_l1(0.3) + 0.6 * smooth_l1(0.05)) / 3, rel=1e-6)
    unweighted = losses(None)
    assert float(unweighted["objectness"]) == pytest.approx((bce(0.5, 1.0) + bce(-1.0, 1.0) + bce(2.0, 0.0)) / 3,
                                                            rel=1e-6)
    assert float(unweighted["box"]) == pytest.approx((smooth_l1(0.3) + smooth_l1(0.05)) / 3, rel=1e-6)
    # The softmax pairs' cross-entropy and the GIoU box loss take the same weights.
    pairs = LevelOutput(torch.stack((torch.zeros_like(logits), logits), -1), deltas, anchors, 1, 3)
    softmax = rpn_losses([pairs], boxes, [(128, 128)], "softmax", (1.0, 1.0, 1.0, 1.0), 4.0, SETTINGS,
                         torch.Generator().manual_seed(0), images_weight=[torch.tensor([1.0, 0.6])])
    assert float(softmax["objectness"]) == pytest.approx(float(weighted["objectness"]), rel=1e-6)  # same probabilities
    giou = rpn_losses([level], boxes, [(128, 128)], "sigmoid", (1.0, 1.0, 1.0, 1.0), 4.0, SETTINGS,
                      torch.Generator().manual_seed(0), box_loss="giou", images_weight=[torch.tensor([1.0, 0.6])])
    moved = [[0.0 + 0.3 * 32, 0.0, 32.0 + 0.3 * 32, 32.0], [64.0, 64.0 - 0.05 * 32, 96.0, 96.0 - 0.05 * 32]]
    assert float(giou["box"]) == pytest.approx(
        (_giou_loss_by_hand(moved[0], [0.0, 0.0, 32.0, 32.0]) + 0.6 * _giou_loss_by_hand(moved[1], [64.0, 64.0, 96.0, 96.0]))
        / 3, rel=1e-5)


def _giou_loss_by_hand(a, b):  # 1 - GIoU of two x1y1x2y2 boxes, written out (Rezatofighi et al. 2019)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1.0 - (inter / union - (hull - union) / hull)


def test_the_giou_box_loss_is_one_minus_giou_of_the_decoded_box_and_its_match():
    from rpn_cli.model.network import LevelOutput

    # Two boxes, each matched to the anchor it sits on; the deltas move the first anchor right by a
    # quarter of its width and double the second's height, so both losses are known in closed form.
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [64.0, 64.0, 96.0, 96.0], [0.0, 64.0, 32.0, 96.0]])
    boxes = [anchors[:2].clone()]
    deltas = torch.tensor([[[0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, float(np.log(2.0))], [0.0, 0.0, 0.0, 0.0]]])
    level = LevelOutput(torch.zeros((1, 3)), deltas, anchors, 1, 3)

    def box_loss(kind):
        return float(rpn_losses([level], boxes, [(128, 128)], "sigmoid", (1.0, 1.0, 1.0, 1.0), 4.0, SETTINGS,
                                torch.Generator().manual_seed(0), box_loss=kind)["box"])

    moved, taller = [8.0, 0.0, 40.0, 32.0], [64.0, 48.0, 96.0, 112.0]
    by_hand = (_giou_loss_by_hand(moved, [0, 0, 32, 32]) + _giou_loss_by_hand(taller, [64, 64, 96, 96])) / 3
    assert box_loss("giou") == pytest.approx(by_hand, rel=1e-6)  # 3 sampled anchors: 2 positive, 1 negative
    smooth_l1 = ((0.25 - 0.5 / 9) + (np.log(2.0) - 0.5 / 9)) / 3  # |x| - beta/2 past beta = 1/9
    assert box_loss("smooth-l1") == pytest.approx(smooth_l1, rel=1e-6)


def test_sampling_keeps_256_at_most_half_positive():
    labels = torch.tensor([POSITIVE] * 300 + [NEGATIVE] * 1000 + [IGNORE] * 50)
    sampled = sample_labels(labels, SETTINGS, torch.Generator().manual_seed(0))
    assert int((sampled == POSITIVE).sum()) == 128 and int((sampled == NEGATIVE).sum()) == 128
    few = torch.tensor([POSITIVE] * 10 + [NEGATIVE] * 1000)
    sampled = sample_labels(few, SETTINGS, torch.Generator().manual_seed(0))
    assert int((sampled == POSITIVE).sum()) == 10 and int((sampled == NEGATIVE).sum()) == 246


def _synthetic_dataset(folder, count=4, size=(160, 128)):
    """Coloured rectangles on noise, written as JPEGs with a COCO file and a VOC folder."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "voc" / "Annotations").mkdir(parents=True)
    (folder / "voc" / "JPEGImages").mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        array = rng.integers(0, 60, (size[1], size[0], 3)).astype(np.uint8)
        objects = []
        for _ in range(2):
            x, y = rng.integers(0, size[0] - 70), rng.integers(0, size[1] - 70)
            w, h = rng.integers(40, 70), rng.integers(40, 70)
            array[y:y + h, x:x + w] = rng.integers(150, 255, 3)
            objects.append((int(x), int(y), int(w), int(h)))
        name = f"{index:03d}.jpg"
        Image.fromarray(array).save(folder / "images" / name, quality=95)
        Image.fromarray(array).save(folder / "voc" / "JPEGImages" / name, quality=95)
        images.append({"id": index + 1, "file_name": name, "width": size[0], "height": size[1]})
        xml = [f"<annotation><filename>{name}</filename><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
        for x, y, w, h in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            xml.append(f"<object><name>thing</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                       f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>")
        (folder / "voc" / "Annotations" / f"{index:03d}.xml").write_text("".join(xml) + "</annotation>")
    annotations.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (folder / "instances.json").write_text(json.dumps(coco))
    return folder


def test_coco_and_voc_readers_agree(tmp_path):
    folder = _synthetic_dataset(tmp_path)
    coco, voc = load_coco(folder / "instances.json"), load_voc(folder / "voc")
    assert len(coco) == len(voc) == 4
    for a, b in zip(coco, voc):
        np.testing.assert_allclose(a.boxes[~a.crowd], b.boxes)
        assert a.path.name == b.path.name and a.path.is_file() and b.path.is_file()
    assert coco[0].crowd.tolist() == [False, False, True]
    assert isinstance(load_dataset(folder / "voc")[0].boxes, np.ndarray)
    train_part, validation = split_validation(coco, 1, seed=0)
    assert len(train_part) == 3 and len(validation) == 1
    with pytest.raises(DataError, match="broken.json"):
        (folder / "broken.json").write_text("{")
        load_coco(folder / "broken.json")


def test_crowd_boxes_are_ignore_regions_with_or_without_a_teacher(tmp_path):
    from rpn_cli.training.loop import _training_images

    folder = _synthetic_dataset(tmp_path)  # image 1 has two boxes and a 10 x 10 crowd box at the corner
    crowd = [[0.0, 0.0, 10.0, 10.0]]
    first = _training_images(load_coco(folder / "instances.json"), None, 0.3, 0.1, tmp_path / "c0.json",
                             lambda event: None)[0]
    assert len(first.boxes) == 2 and first.ignore.tolist() == crowd

    class Teacher:  # one sure and one unsure detection of another category on every photo
        fingerprint = "test"

        def detections(self, image, min_score):
            return (np.array([[60, 60, 90, 90], [100, 10, 120, 30]], np.float32), np.array([0.9, 0.15], np.float32),
                    np.array([2, 3]))

    for partial in (False, True):
        first = _training_images(load_coco(folder / "instances.json", partial=partial), Teacher(), 0.3, 0.1,
                                 tmp_path / f"c{partial}.json", lambda event: None)[0]
        assert [60, 60, 90, 90] in first.boxes.tolist() and crowd[0] not in first.boxes.tolist()
        # The unsure detection is an unknown region only where the annotations are partial.
        assert first.ignore.tolist() == ([[100, 10, 120, 30]] if partial else []) + crowd


def _small_spec():
    return default_mobilenet_spec(fpn_channels=32, mid_channels=32, shorter_side=128, max_size=160)


@pytest.mark.parametrize("box_loss, precision", [("smooth-l1", "float32"), ("giou", "float32"),
                                                 ("smooth-l1", "bfloat16")])
def test_a_few_steps_lower_the_loss(tmp_path, box_loss, precision):
    folder = _synthetic_dataset(tmp_path)
    images = load_coco(folder / "instances.json")
    torch.manual_seed(0)
    spec = _small_spec()
    model = RegionProposalNetwork(spec).train()
    batch = torch.stack([to_tensor(Image.open(image.path).convert("RGB"), spec.preprocess) for image in images])
    boxes = [torch.from_numpy(image.boxes[~image.crowd]) for image in images]
    sizes = [(image.width, image.height) for image in images]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_now(seed):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            levels = model(batch)
        losses = rpn_losses(levels, boxes, sizes, spec.score, spec.box_weights, spec.delta_clamp,
                            SETTINGS, torch.Generator().manual_seed(seed), box_loss=box_loss)
        return losses["objectness"] + losses["box"]

    with torch.no_grad():
        before = float(loss_now(0))
    for step in range(20):
        loss = loss_now(step + 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_now(0))
    assert after < before * 0.8


def test_train_writes_a_checkpoint_and_resumes(tmp_path):
    folder = _synthetic_dataset(tmp_path / "data")
    work = tmp_path / "work"
    config = TrainConfig(sources=[str(folder / "instances.json"), str(folder / "voc")], work_dir=str(work), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, command="test")
    events = []
    train(config, _small_spec(), torch.device("cpu"), events.append)
    state = torch.load(work / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    config.epochs, config.command = 2, "test --epochs 2"
    report = train(config, _small_spec(), torch.device("cpu"), events.append)
    from rpn_cli.io.checkpoint import read_spec

    # The resumed run's file keeps both legs: each epoch names its command, the resumed one what changed.
    first, second = read_spec(work / "final.safetensors").provenance["history"]
    assert (first["command"], second["command"]) == ("test", "test --epochs 2")
    assert "resumed_with_changed_settings" not in first
    assert second["resumed_with_changed_settings"] == ["--epochs 2 (saved: 1)"]
    warnings = [e.message for e in events if e.kind == "warning"]
    assert warnings[-2:] == [f"resumed from {work / 'last.pt'} after epoch 1",
                             "resumed with settings that differ from the saved run's: --epochs 2 (saved: 1)"]
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    config.learning_rate, config.train_sizes, config.loader_threads = 0.01, [128, 160], 1
    other_side = default_mobilenet_spec(fpn_channels=32, mid_channels=32, shorter_side=96, max_size=160)
    train(config, other_side, torch.device("cpu"), events.append)
    assert events[-1].message == ("resumed with settings that differ from the saved run's: "
                                  "--lr 0.01 (saved: 0.02), --shorter-side 96 (saved: 128), "
                                  "--train-sizes 128,160 (saved: 128)")
    config.learning_rate, config.train_sizes = 0.02, [128]  # as saved: no such line (loading threads change nothing)
    train(config, _small_spec(), torch.device("cpu"), events.append)
    assert events[-1].message == f"resumed from {work / 'last.pt'} after epoch 2"
    # A last.pt from before settings were kept says so; one with a damaged field is refused in one line.
    state = torch.load(work / "last.pt", weights_only=True)
    torch.save({key: value for key, value in state.items() if key != "settings"}, work / "last.pt")
    train(config, _small_spec(), torch.device("cpu"), events.append)
    assert events[-1].message == (f"{work / 'last.pt'} does not record its run's settings (written before rpn "
                                  "kept them, or damaged): they are not compared with these")
    from rpn_cli.errors import CheckpointError

    torch.save({**state, "ema_decay": torch.zeros(2)}, work / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt: not a training state written by rpn train .a bad setup"):
        train(config, _small_spec(), torch.device("cpu"), events.append)
    provenance = read_spec(work / "final.safetensors").provenance
    assert provenance["command"] == "test --epochs 2" and len(provenance["history"]) == 2
    assert provenance["validation"] == report and "AR@100" in report


def test_bfloat16_training_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights(tmp_path):
    from safetensors.torch import load_file

    folder = _synthetic_dataset(tmp_path / "data")
    start = _small_checkpoint(tmp_path)
    weights = {"start": load_file(start)}
    for precision in ("float32", "bfloat16"):
        config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / precision), epochs=1,
                             batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1,
                             init_checkpoint=str(start), learning_rate=0.05, precision=precision)
        train(config, _small_spec(), torch.device("cpu"))
        weights[precision] = load_file(tmp_path / precision / "final.safetensors")
    heads = [key for key in weights["start"] if key.startswith("head") and key.endswith("weight")]
    single, half = (torch.cat([(weights[kind][key] - weights["start"][key]).flatten() for key in heads])
                    for kind in ("float32", "bfloat16"))
    assert not torch.equal(single, half)  # the forward pass did run in bfloat16 ...
    # ... and the same steps moved the weights the same way (bfloat16 keeps 8 bits of mantissa).
    assert torch.nn.functional.cosine_similarity(single, half, dim=0) > 0.95


def test_gradient_clipping_bounds_the_first_step_by_the_learning_rate_times_the_norm(tmp_path):
    from safetensors.torch import load_file

    from rpn_cli.io.checkpoint import read_spec

    folder = _synthetic_dataset(tmp_path / "data")
    start = _small_checkpoint(tmp_path)
    before = load_file(start)
    moved, norms = {}, {}
    for clip in (None, 1e-3):
        # 3 training photos in one batch: one step, at the full learning rate (warm-up of 1 step), and
        # no weight decay, so the step is -lr x the (clipped) gradient: momentum starts from zero.
        config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / str(clip)), epochs=1,
                             batch_size=3, validation_count=1, train_sizes=[128], warmup_steps=1, weight_decay=0.0,
                             init_checkpoint=str(start), learning_rate=0.05, clip_gradient_norm=clip)
        events = []
        train(config, _small_spec(), torch.device("cpu"), events.append)
        after = load_file(tmp_path / str(clip) / "final.safetensors")
        moved[clip] = torch.cat([(after[key] - before[key]).flatten() for key in before
                                 if before[key].is_floating_point()]).norm().item()
        [step] = [event for event in events if event.kind == "step"]
        norms[clip] = step.losses["gradient_norm"]
        [epoch] = read_spec(tmp_path / str(clip) / "final.safetensors").provenance["history"]
        assert epoch["losses"]["gradient_norm"] == pytest.approx(norms[clip], rel=1e-4)  # rounded to 5 digits
    assert norms[None] == pytest.approx(norms[1e-3])  # the norm is measured before clipping ...
    assert norms[None] > 1e-3
    assert moved[None] == pytest.approx(0.05 * norms[None], rel=1e-4)  # ... and is the step's, unclipped
    assert moved[1e-3] == pytest.approx(0.05 * 1e-3, rel=1e-4)


def test_a_non_finite_gradient_behind_a_finite_loss_stops_the_run_before_the_step(tmp_path, monkeypatch):
    import rpn_cli.training.loop as loop
    from rpn_cli.errors import TrainingError

    def losses_with_a_nan_gradient(levels, *args, **kwargs):
        losses = rpn_losses(levels, *args, **kwargs)
        logit = levels[0].logits.flatten()[0]
        # sqrt(|0|) adds 0 to the loss and NaN (0 x inf) to the gradient.
        losses["box"] = losses["box"] + (logit - logit.detach()).abs().sqrt()
        return losses

    monkeypatch.setattr(loop, "rpn_losses", losses_with_a_nan_gradient)
    folder = _synthetic_dataset(tmp_path / "data")
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         batch_size=3, validation_count=1, train_sizes=[128], warmup_steps=1)
    with pytest.raises(TrainingError, match="epoch 1, step 1: the gradient norm is nan"):
        train(config, _small_spec(), torch.device("cpu"))
    assert not (tmp_path / "work" / "last.pt").exists() and not (tmp_path / "work" / "final.safetensors").exists()


def test_a_run_with_settings_no_run_can_have_is_refused_before_anything_is_written(tmp_path):
    from rpn_cli.errors import UsageError

    for options, message in (({"box_loss": "iou"}, "--box-loss iou: choose smooth-l1 or giou"),
                             ({"precision": "float16"}, "--precision float16: choose float32 or bfloat16"),
                             ({"clip_gradient_norm": 0.0}, "--clip-gradient-norm 0.0: expected a number above 0"),
                             ({"clip_gradient_norm": float("nan")}, "--clip-gradient-norm nan: expected a number"),
                             ({"ema_decay": 1.0}, "--ema-decay 1.0: expected a number between 0 and 1"),
                             ({"ema_decay": 0.0}, "--ema-decay 0.0: expected a number between 0 and 1"),
                             ({"learning_rate": -1.0}, "--lr -1.0: expected a number above 0"),
                             ({"learning_rate": float("inf")}, "--lr inf: expected a number above 0"),
                             ({"box_loss_weight": float("nan")}, "--box-loss-weight nan: expected a number from 0"),
                             ({"allowed_border": -2.0}, "--allowed-border -2.0: expected a number of pixels")):
        config = TrainConfig(sources=[], work_dir=str(tmp_path / "work"), **options)
        with pytest.raises(UsageError, match=message):
            train(config, _small_spec(), torch.device("cpu"))
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("start", ["init", "scratch"])
def test_the_moving_average_of_the_weights_is_what_the_run_writes_and_survives_a_resume(tmp_path, start):
    from safetensors.torch import load_file

    from rpn_cli.errors import CheckpointError
    from rpn_cli.io.checkpoint import read_spec

    folder = _synthetic_dataset(tmp_path / "data")
    init = str(_small_checkpoint(tmp_path)) if start == "init" else None  # from scratch, BatchNorm trains
    decay = 0.6

    def config(work, epochs, ema_decay=decay):
        # 3 training photos in one batch: one step an epoch, so last.pt holds each step's weights.
        return TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / work), epochs=epochs,
                           batch_size=3, validation_count=1, train_sizes=[128], warmup_steps=1,
                           init_checkpoint=init, learning_rate=0.05, ema_decay=ema_decay)

    steps, report = [], {}
    for epochs in (1, 2, 3):  # one run, resumed after each epoch (the average travels in last.pt)
        report = train(config("work", epochs), _small_spec(), torch.device("cpu"))
        steps.append(torch.load(tmp_path / "work" / "last.pt", weights_only=True)["model"])
    written = load_file(tmp_path / "work" / "final.safetensors")
    weights = [decay ** 2, decay, 1.0]  # the oracle: the unbiased EMA written out
    averaged = ["head.conv1.weight", "head.score.bias", "head.loc.weight", "backbone.fpn.layer_blocks.0.0.weight"]
    batchnorm = "backbone.stages.0.4.conv.0.1"
    if start == "scratch":  # BatchNorm statistics are averaged as well; its step count is the model's
        averaged.append(f"{batchnorm}.running_mean")
        assert int(written[f"{batchnorm}.num_batches_tracked"]) == int(steps[-1][f"{batchnorm}.num_batches_tracked"]) == 3
    for key in averaged:
        expected = sum(w * step[key] for w, step in zip(weights, steps)) / sum(weights)
        torch.testing.assert_close(written[key], expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(written[key], steps[-1][key])  # not the last step's
    history = read_spec(tmp_path / "work" / "final.safetensors").provenance["history"]
    assert history[-1]["validation"] == report and "AR@100" in history[-1]["validation_last_step"]
    for other, message in ((None, "saved by a run with --ema-decay 0.6, and this one is without --ema-decay"),
                           (0.9, "saved by a run with --ema-decay 0.6, and this one is with --ema-decay 0.9")):
        with pytest.raises(CheckpointError, match=message):
            train(config("work", 4, other), _small_spec(), torch.device("cpu"))


def test_a_run_from_init_records_what_it_started_from(tmp_path):
    folder = _synthetic_dataset(tmp_path / "data")
    first = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "first"), epochs=1,
                        batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, command="first run")
    train(first, _small_spec(), torch.device("cpu"))
    first.epochs, first.command = 2, "first run, resumed"
    first_report = train(first, _small_spec(), torch.device("cpu"))
    second = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "second"), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, command="second run",
                         init_checkpoint=str(tmp_path / "first" / "final.safetensors"))
    train(second, _small_spec(), torch.device("cpu"))
    from dataclasses import replace

    from rpn_cli.io.checkpoint import load_checkpoint, read_spec, save_checkpoint

    provenance = read_spec(tmp_path / "second" / "final.safetensors").provenance
    assert provenance["command"] == "second run"
    started_from = provenance["initialised_from"]
    assert started_from["command"] == "first run, resumed" and started_from["epochs"] == 2
    assert started_from["commands"] == ["first run", "first run, resumed"]
    assert started_from["validation"] == first_report and "history" not in started_from
    # Level offsets are fitted to the weights they came with: a run from them leaves them out, and says so.
    fitted = load_checkpoint(tmp_path / "first" / "final.safetensors", "cpu")
    fitted.spec.proposals = replace(fitted.spec.proposals, level_offsets=(0.0, 0.0, -0.75))
    save_checkpoint(fitted, tmp_path / "fitted.safetensors")
    third = replace(second, work_dir=str(tmp_path / "third"), init_checkpoint=str(tmp_path / "fitted.safetensors"))
    events = []
    train(third, _small_spec(), torch.device("cpu"), events.append)
    assert any(event.kind == "warning" and "its level offsets are left out" in event.message for event in events)
    assert read_spec(tmp_path / "third" / "final.safetensors").proposals.level_offsets == ()



def test_head_depth_deepens_an_init_checkpoint_or_builds_a_deep_head_from_scratch(tmp_path):
    from safetensors.torch import load_file

    from rpn_cli.errors import CheckpointError, UsageError
    from rpn_cli.io.checkpoint import read_spec

    folder = _synthetic_dataset(tmp_path / "data")
    start = _small_checkpoint(tmp_path)

    def config(name, **options):
        return TrainConfig(**{"sources": [str(folder / "instances.json")], "work_dir": str(tmp_path / name),
                              "epochs": 1, "batch_size": 2, "validation_count": 1, "train_sizes": [128],
                              "warmup_steps": 1, **options})

    train(config("deeper", init_checkpoint=str(start), head_depth=2, learning_rate=0.05), _small_spec(),
          torch.device("cpu"))
    grown = tmp_path / "deeper" / "final.safetensors"
    assert read_spec(grown).head.conv_depth == 2
    assert read_spec(grown).provenance["config"]["head_depth"] == 2
    weights, source = load_file(grown), load_file(start)
    assert set(weights) == set(source) | {"head.more_convs.0.weight", "head.more_convs.0.bias"}
    # The added convolution started as the identity and trained from there.
    dirac = torch.nn.init.dirac_(torch.empty_like(weights["head.more_convs.0.weight"]))
    change = (weights["head.more_convs.0.weight"] - dirac).abs().max()
    assert 0 < change < 0.5

    train(config("scratch", head_depth=3), _small_spec(), torch.device("cpu"))
    assert read_spec(tmp_path / "scratch" / "final.safetensors").head.conv_depth == 3

    # Refused before the data is read or anything written.
    with pytest.raises(UsageError, match=r"--head-depth 1: .*final.safetensors's head has 2 convolutions"):
        train(config("shallower", init_checkpoint=str(grown), head_depth=1), _small_spec(), torch.device("cpu"))
    with pytest.raises(UsageError, match="--head-depth 17: expected a whole number from 1 to 16"):
        train(config("too-deep", head_depth=17), _small_spec(), torch.device("cpu"))
    assert not (tmp_path / "shallower").exists() and not (tmp_path / "too-deep").exists()

    # A resume must grow the same head: last.pt of a deeper one is refused in one line.
    with pytest.raises(CheckpointError, match="last.pt: saved by a run with another backbone, --head-depth, start"):
        train(config("deeper", init_checkpoint=str(start), head_depth=3, epochs=2), _small_spec(),
              torch.device("cpu"))


@pytest.mark.parametrize("history, summary", [
    (5, {"command": "made elsewhere"}),
    (["a", {"command": ["x"]}, {"command": "leg 1"}, {"command": "leg 2"}],
     {"command": "made elsewhere", "epochs": 4, "commands": ["leg 1", "leg 2"]}),
])
def test_a_start_file_with_an_odd_history_is_summarised_from_what_it_holds(tmp_path, history, summary):
    """A checkpoint's provenance is the file's own JSON: what --init keeps of it never trusts its shape."""
    from rpn_cli.io.checkpoint import read_spec, save_checkpoint

    folder = _synthetic_dataset(tmp_path / "data")
    spec = _small_spec()
    spec.provenance = {"command": "made elsewhere", "history": history}
    save_checkpoint(RegionProposalNetwork(spec), tmp_path / "start.safetensors")
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1,
                         init_checkpoint=str(tmp_path / "start.safetensors"))
    train(config, _small_spec(), torch.device("cpu"))
    assert read_spec(tmp_path / "work" / "final.safetensors").provenance["initialised_from"] == summary

def test_teacher_finds_the_objects_of_a_real_photo(coco_dir, teacher_model):
    pytest.importorskip("onnxruntime")
    from torchvision.ops import box_iou

    from rpn_cli.io.images import load_image
    from rpn_cli.training.teacher import YoloxTeacher, merge_teacher_boxes

    image = load_coco(coco_dir / "instances.json")[0]
    boxes, scores = YoloxTeacher(teacher_model).boxes(load_image(image.path), 0.3)
    assert len(boxes) > 0 and np.all(scores >= 0.3)
    overlap = box_iou(torch.from_numpy(image.boxes[~image.crowd]), torch.from_numpy(boxes)).max(dim=1).values
    assert float((overlap >= 0.5).float().mean()) >= 0.5  # it finds most annotated objects
    merged = merge_teacher_boxes(image.boxes, boxes)
    assert len(image.boxes) <= len(merged) <= len(image.boxes) + len(boxes)
    np.testing.assert_array_equal(merged[: len(image.boxes)], image.boxes)


def test_training_with_a_teacher_labels_unlabeled_folders(tmp_path, teacher_model, coco_dir):
    pytest.importorskip("onnxruntime")
    import shutil

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for image in load_coco(coco_dir / "instances.json")[:2]:
        shutil.copy(image.path, unlabeled / image.path.name)
    folder = _synthetic_dataset(tmp_path / "data")
    work = tmp_path / "work"
    config = TrainConfig(sources=[str(folder / "instances.json"), str(unlabeled)], work_dir=str(work), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], teacher=str(teacher_model))
    train(config, _small_spec(), torch.device("cpu"))
    cache = json.loads((work / "teacher_detections.json").read_text())
    assert cache["min_score"] == 0.1
    labelled_by_teacher = [key for key in cache["images"] if key.startswith(str(unlabeled))]
    assert len(labelled_by_teacher) == 2
    assert all(len(cache["images"][key]) > 0 for key in labelled_by_teacher)


def test_loading_threads_train_the_very_model_sequential_loading_trains(tmp_path):
    # Sizes, order and flips are drawn before loading, so threads decoding ahead change nothing.
    folder = _synthetic_dataset(tmp_path / "data", count=7)
    weights = []
    for threads in (0, 3):
        config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / f"work{threads}"),
                             epochs=2, batch_size=2, validation_count=1, train_sizes=[128, 160], warmup_steps=1,
                             loader_threads=threads)
        train(config, _small_spec(), torch.device("cpu"), lambda event: None)
        weights.append(torch.load(tmp_path / f"work{threads}" / "last.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


@pytest.mark.parametrize("loader_threads", [0, 2])
def test_an_unreadable_image_is_skipped_with_a_warning(tmp_path, loader_threads):
    folder = _synthetic_dataset(tmp_path / "data")
    images = load_coco(folder / "instances.json")
    train_part, _ = split_validation(images, 1, seed=0)
    broken = train_part[0].path
    broken.write_bytes(b"not a jpeg")
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1,
                         loader_threads=loader_threads)
    events = []
    train(config, _small_spec(), torch.device("cpu"), events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any(broken.name in message for message in warnings), warnings
    assert (tmp_path / "work" / "final.safetensors").exists()


def test_the_seed_projects_c4_trains_from_scratch_or_from_imagenet_weights(tmp_path):
    from torchvision.models import resnet50
    from typer.testing import CliRunner

    from rpn_cli.cli import app
    from rpn_cli.io.checkpoint import load_checkpoint

    folder = _synthetic_dataset(tmp_path / "data", count=3, size=(96, 80))
    torch.manual_seed(3)
    imagenet = resnet50(weights=None)
    with torch.no_grad():  # statistics that training in eval mode must keep
        imagenet.layer1[0].bn1.running_mean.uniform_(-1, 1)
    torch.save(imagenet.state_dict(), tmp_path / "resnet50.pth")
    common = [str(folder / "instances.json"), "--backbone", "resnet50-c4", "--train-sizes", "80,96", "--epochs", "1",
              "--batch-size", "2", "--validation", "1", "--shorter-side", "96", "--quiet"]
    runner = CliRunner()
    scratch = runner.invoke(app, ["train", *common, "--work-dir", str(tmp_path / "scratch"),
                                  "--box-loss", "giou", "--box-loss-weight", "2"])
    assert scratch.exit_code == 0, scratch.output
    assert "trains from scratch" in scratch.output
    model = load_checkpoint(tmp_path / "scratch" / "final.safetensors", "cpu")
    assert model.spec.backbone.name == "resnet50-c4" and model.spec.score == "softmax2"
    assert model.spec.preprocess.size == 96 and model.spec.preprocess.interpolation == "bicubic"
    assert model.spec.provenance["config"]["freeze_blocks"] == 0
    assert model.spec.provenance["config"]["train_sizes"] == [80, 96]
    assert (model.spec.provenance["config"]["box_loss"], model.spec.provenance["config"]["box_loss_weight"]) == ("giou", 2)
    # From scratch, BatchNorm learns its statistics (they start at mean 0).
    assert model.backbone.body[1].running_mean.abs().sum() > 0

    pretrained = runner.invoke(app, ["train", *common, "--work-dir", str(tmp_path / "imagenet"),
                                     "--backbone-weights", str(tmp_path / "resnet50.pth")])
    assert pretrained.exit_code == 0, pretrained.output
    model = load_checkpoint(tmp_path / "imagenet" / "final.safetensors", "cpu")
    assert model.spec.provenance["config"]["freeze_blocks"] == 4
    block = model.backbone.body[4][0]
    assert torch.equal(block.bn1.running_mean, imagenet.layer1[0].bn1.running_mean)  # frozen statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.backbone.body[0].weight, imagenet.conv1.weight / std, rtol=0, atol=0)  # fixed
    assert not torch.equal(block.conv2.weight, imagenet.layer1[0].conv2.weight)  # layer1 trains

    # The ImageNet run's last.pt cannot be continued from scratch: one line naming it, last.pt kept.
    mixed = runner.invoke(app, ["train", *common, "--work-dir", str(tmp_path / "imagenet"), "--epochs", "2"])
    assert mixed.exit_code == 3 and "last.pt: saved by a run with another backbone, --head-depth, start" in mixed.output
    assert (tmp_path / "imagenet" / "last.pt").is_file()
    for options, message in ((["--train-sizes", "96,x"], "--train-sizes 96,x: expected comma-separated whole"),
                             (["--train-sizes", "96,500.5"], "--train-sizes 96,500.5: expected comma-separated whole"),
                             (["--train-sizes", "16"], "--train-sizes 16: expected sizes of at least 32"),
                             (["--box-loss", "iou"], "--box-loss iou: choose smooth-l1 or giou"),
                             (["--precision", "float16"], "--precision float16: choose float32 or bfloat16"),
                             (["--box-loss-weight", "-1"], "Invalid value for '--box-loss-weight'"),
                             (["--clip-gradient-norm", "0"], "--clip-gradient-norm 0.0: expected a number above 0"),
                             (["--ema-decay", "1"], "--ema-decay 1.0: expected a number between 0 and 1"),
                             (["--ema-decay", "abc"], "Invalid value for '--ema-decay'"),
                             (["--init", str(tmp_path / "scratch" / "final.safetensors")], "--init: the checkpoint sets")):
        bad = runner.invoke(app, ["train", *common, "--work-dir", str(tmp_path / "imagenet"), "--restart", *options])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert (tmp_path / "imagenet" / "last.pt").is_file()  # refused before --restart deleted anything


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_keeps_the_last_epoch(tmp_path):
    from typer.testing import CliRunner

    from rpn_cli.cli import app

    folder = _synthetic_dataset(tmp_path / "data", count=3, size=(96, 80))
    common = [str(folder / "instances.json"), "--work-dir", str(tmp_path / "work"), "--batch-size", "1",
              "--validation", "1", "--train-sizes", "64", "--shorter-side", "64", "--quiet"]
    first = CliRunner().invoke(app, ["train", *common, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    saved, final = (tmp_path / "work" / "last.pt").read_bytes(), (tmp_path / "work" / "final.safetensors").read_bytes()
    # A learning rate no network survives, resuming: the weights overflow within a step or two of epoch 2.
    diverged = CliRunner().invoke(app, ["train", *common, "--epochs", "30", "--lr", "1e30"])
    assert diverged.exit_code == 7, diverged.output
    # Warnings aside (resumed; without the packaged ImageNet weights, a trunk from scratch): one line.
    message = [line for line in diverged.output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(message) == 1 and message[0].startswith("error: epoch 2, step "), diverged.output
    assert message[0].endswith("(training diverged); last.pt holds epoch 1, the last finished one: resume from it "
                               "or restart with a lower --lr")
    assert (tmp_path / "work" / "last.pt").read_bytes() == saved  # no epoch of NaN weights took its place
    assert (tmp_path / "work" / "final.safetensors").read_bytes() == final
    fresh = CliRunner().invoke(app, ["train", *common, "--epochs", "2", "--lr", "1e30", "--restart"])
    assert fresh.exit_code == 7 and fresh.output.strip().endswith(
        "(training diverged); no epoch finished: restart with a lower --lr"), fresh.output


def test_a_run_without_a_terminal_logs_progress_lines(tmp_path):
    from typer.testing import CliRunner

    from rpn_cli.cli import app

    folder = _synthetic_dataset(tmp_path / "data", count=3, size=(96, 80))
    result = CliRunner().invoke(app, ["train", str(folder / "instances.json"), "--work-dir", str(tmp_path / "work"),
                                      "--epochs", "2", "--batch-size", "1", "--validation", "1",
                                      "--train-sizes", "64", "--shorter-side", "64"])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith(("epoch 1: ", "epoch 2: "))]
    # Two training photos a step each: the last step of each epoch logs, then the epoch's summary.
    assert [line.split(" objectness")[0] for line in steps] == ["epoch 1: 2/2", "epoch 2: 2/2"], result.output
    assert all(line.endswith(" min)") and "objectness" in line and " gradient_norm " in line for line in steps), steps
    assert "epoch 2/2 losses" in result.output
    quiet = CliRunner().invoke(app, ["train", str(folder / "instances.json"), "--work-dir", str(tmp_path / "quiet"),
                                     "--epochs", "1", "--batch-size", "1", "--validation", "1",
                                     "--train-sizes", "64", "--shorter-side", "64", "--quiet"])
    assert quiet.exit_code == 0 and "1/2" not in quiet.output, quiet.output


def test_efficientnet_lite0_trains_from_its_imagenet_weights_and_proposes(tmp_path):
    from typer.testing import CliRunner

    from rpn_cli.cli import app
    from rpn_cli.io.checkpoint import load_checkpoint
    from rpn_cli.model.efficientnet import (
        efficientnet_lite0_features,
        efficientnet_pytorch_key_map,
    )

    folder = _synthetic_dataset(tmp_path / "data", count=3, size=(96, 80))
    torch.manual_seed(4)
    source = efficientnet_lite0_features()
    with torch.no_grad():  # statistics that frozen BatchNorm must keep
        for module in source.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
    ours = source.state_dict()
    imagenet = {theirs: ours[key] for theirs, key in efficientnet_pytorch_key_map(source).items()}
    torch.save(imagenet, tmp_path / "lite0.pth")
    common = [str(folder / "instances.json"), "--backbone", "efficientnet_lite0_fpn", "--train-sizes", "64,96",
              "--epochs", "1", "--batch-size", "2", "--validation", "1", "--shorter-side", "96", "--quiet"]
    result = CliRunner().invoke(app, ["train", *common, "--work-dir", str(tmp_path / "work"),
                                      "--backbone-weights", str(tmp_path / "lite0.pth")])
    assert result.exit_code == 0, result.output
    model = load_checkpoint(tmp_path / "work" / "final.safetensors", "cpu")
    assert model.spec.backbone.name == "efficientnet_lite0_fpn"
    assert (model.spec.preprocess.mean, model.spec.preprocess.size_divisible) == ([127.0] * 3, 32)
    assert model.spec.provenance["config"]["freeze_blocks"] == 4
    stem, first_trained = model.backbone.stages[0][0], model.backbone.stages[0][4]
    assert torch.equal(stem[1].weight, imagenet["_conv_stem.weight"])  # fixed (after the stem's padding)
    assert torch.equal(stem[2].running_mean, imagenet["_bn0.running_mean"])
    assert torch.equal(model.backbone.stages[0][3].conv[0].weight, imagenet["_blocks.2._expand_conv.weight"])
    assert not torch.equal(first_trained.conv[0].weight, imagenet["_blocks.3._expand_conv.weight"])  # trains
    proposed = CliRunner().invoke(app, ["propose", str(folder / "images"), "-c", str(tmp_path / "work" / "final.safetensors"),
                                        "-q", "--top-k", "5"])
    assert proposed.exit_code == 0, proposed.output
    records = [json.loads(line) for line in proposed.output.splitlines()]
    assert len(records) == 3 and all(len(record["boxes"]) == 5 for record in records)


def test_training_on_a_partially_labelled_file_with_a_fixed_validation_set(tmp_path, teacher_model, monkeypatch):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    import rpn_cli.training.loop as loop
    from rpn_cli.cli import app
    from rpn_cli.io.checkpoint import load_checkpoint

    folder = _synthetic_dataset(tmp_path / "data")
    held_out = _synthetic_dataset(tmp_path / "held-out", count=1)  # 000.jpg: the same photo name as in data
    common = ["--partial", str(folder / "instances.json"), "--validation-set", str(held_out / "instances.json"),
              "--train-sizes", "128", "--epochs", "1", "--batch-size", "2", "--quiet"]
    runner = CliRunner()
    no_teacher = runner.invoke(app, ["train", *common, "--work-dir", str(tmp_path / "work")])
    assert no_teacher.exit_code == 2 and "--partial needs --teacher" in no_teacher.output
    soft = runner.invoke(app, ["train", str(folder / "instances.json"), "--soft-targets", "--work-dir",
                               str(tmp_path / "soft")])
    assert soft.exit_code == 2 and "--soft-targets needs --teacher" in soft.output
    assert not (tmp_path / "soft").exists()  # refused before anything is written
    weighted = runner.invoke(app, ["train", str(folder / "instances.json"), "--confidence-weights", "--work-dir",
                                   str(tmp_path / "weighted")])
    assert weighted.exit_code == 2 and "--confidence-weights needs --teacher" in weighted.output
    assert not (tmp_path / "weighted").exists()
    both = runner.invoke(app, ["train", *common, "--validation", "3", "--teacher", str(teacher_model),
                               "--work-dir", str(tmp_path / "work")])
    assert both.exit_code == 2 and "--validation and --validation-set: choose one" in both.output

    weights_seen = []

    def recording_losses(*args, **kwargs):
        weights_seen.append(kwargs.get("images_weight"))
        return rpn_losses(*args, **kwargs)

    monkeypatch.setattr(loop, "rpn_losses", recording_losses)
    run = runner.invoke(app, ["train", *common, "--teacher", str(teacher_model), "--work-dir", str(tmp_path / "work"),
                              "--init", str(_small_checkpoint(tmp_path)), "--confidence-weights"])
    assert run.exit_code == 0, run.output
    # Every step weighs each box: 1 for a human box, the teacher's objectness (from --teacher-threshold,
    # 0.3) for its own, as cached.
    assert weights_seen and all(weights is not None for weights in weights_seen)
    values = torch.cat([weight for weights in weights_seen for weight in weights])
    cache = json.loads((tmp_path / "work" / "teacher_detections.json").read_text())
    cached = torch.tensor([row[4] for rows in cache["images"].values() for row in rows if row[4] >= 0.3])
    teacher_weights = values[values < 1]
    assert teacher_weights.numel() and cached.numel()
    assert bool((teacher_weights[:, None] - cached[None, :]).abs().min(dim=1).values.le(1e-6).all())
    provenance = load_checkpoint(tmp_path / "work" / "final.safetensors", "cpu").spec.provenance
    assert provenance["training_images"] == 3  # 000.jpg is the validation set's
    assert provenance["validation_images"] == ["1"]
    assert provenance["partially_labelled_data"] == [str(folder / "instances.json")]
    assert provenance["validation"]["images"] == 1
    assert provenance["config"]["soft_targets"] is False and provenance["config"]["confidence_weights"] is True
    assert sorted(Path(key).name for key in cache["images"]) == ["001.jpg", "002.jpg", "003.jpg"]


def _small_checkpoint(tmp_path):
    from rpn_cli.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "small.safetensors"
    save_checkpoint(RegionProposalNetwork(_small_spec()), path)
    return path


def test_a_decompression_bomb_in_the_training_data_is_skipped_with_a_warning(tmp_path):
    folder = _synthetic_dataset(tmp_path / "data")
    coco = json.loads((folder / "instances.json").read_text())
    Image.new("L", (12000, 8000)).save(folder / "images" / "bomb.png")  # 96 MP, over Pillow's 89.5 MP guard
    coco["images"].append({"id": 50, "file_name": "bomb.png", "width": 12000, "height": 8000})
    coco["annotations"].append({"id": 500, "image_id": 50, "category_id": 1, "bbox": [10, 10, 400, 400],
                                "area": 160000, "iscrowd": 0})
    (folder / "instances.json").write_text(json.dumps(coco))
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, seed=3)
    events = []
    train(config, _small_spec(), torch.device("cpu"), events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("bomb.png" in message and "decompression bomb guard" in message for message in warnings), warnings
    assert (tmp_path / "work" / "final.safetensors").exists()
