"""torchvision's CPU NMS against our early-stopping greedy NMS, side by side on the same boxes.

    python benchmarks/benchmark_nms.py [--boxes 3000] [--keep 300] [--repeats 20]

Boxes: uniformly random; clustered (noisy copies of a few boxes); and rpn: what the default
checkpoint's proposal layer hands to NMS on COCO photos (its per-level top 3000, about 8000 boxes),
averaged over --photos photos of ../shared/data/coco-train2017/images.

Then the whole proposal layer on a batch of --batch photos (one padded batch through the default
checkpoint): image by image (what the CPU runs) against one pass over the batch (what a GPU runs,
``ProposalLayer.for_batch``), on this machine's CPU; and image by image without and with box voting
(``--vote-iou``), which is the cost voting adds to a photo, and with 1,000 boxes a level before NMS
instead of the shipped 3,000.
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import nms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rpn_cli.model.nms import greedy_nms  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "coco-train2017" / "images"


def _rpn_candidates(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(boxes, scores) entering NMS for the first ``count`` photos: the proposal layer run with an
    IoU threshold of 1 (nothing suppressed) and no post-NMS limit."""

    from rpn_cli.inference.predict import proposals_for_batch
    from rpn_cli.inference.runtime import load_model
    from rpn_cli.io.images import load_image
    from rpn_cli.model.preprocess import prepare_image

    model = load_model(DEFAULT_CHECKPOINT)
    proposal_layer = model.spec.proposal_layer(nms_iou=1.0, post_nms_top_n=10**9)
    candidates = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:count]:
        prepared = prepare_image(load_image(path), model.spec.preprocess)
        found = proposals_for_batch(model, [prepared], proposal_layer)[0]
        candidates.append((found.boxes, found.scores))
    return candidates


def _batch_layer_times(count: int, repeats: int) -> tuple[float, float, bool]:
    """Seconds of the proposal layer on one batch of ``count`` photos: per image, and in one pass."""
    from rpn_cli import Proposer
    from rpn_cli.inference.predict import run_model

    proposer = Proposer(DEFAULT_CHECKPOINT, device="cpu", backend="torch", precision="float32")
    prepared = [proposer.prepare(path) for path in sorted(PHOTOS.glob("*.jpg"))[:count]]
    levels, layer = run_model(proposer.model, prepared), proposer.proposal_layer
    sizes = torch.tensor([[image.resized_size[1], image.resized_size[0]] for image in prepared])

    def image_by_image():
        return [layer(levels, index, int(height), int(width)) for index, (height, width) in enumerate(sizes.tolist())]

    boxes, _, counts = layer.for_batch(levels, sizes)
    # The tests' tolerance: the one-pass NMS sees boxes offset per image, so coordinates may round apart.
    same = all(a[0].shape == b.shape and torch.allclose(a[0], b, rtol=0, atol=1e-3)
               for a, b in zip(image_by_image(), boxes.split(counts)))
    return _time(image_by_image, repeats), _time(lambda: layer.for_batch(levels, sizes), repeats), same


# The proposal layer's settings timed side by side: the shipped ones, without voting, and with fewer
# boxes per level into NMS (torchvision's FPN keeps 1,000 per level at test time).
LAYER_VARIANTS = (("shipped (3,000 a level before NMS, voting at 0.7)", {}),
                  ("without voting", {"vote_iou": 0.0}),
                  ("1,000 a level before NMS, voting at 0.7", {"pre_nms_top_n": 1000}))


def _layer_times(count: int, repeats: int) -> list[float]:
    """Seconds a photo of the per-image proposal layer on ``count`` photos, for each of LAYER_VARIANTS."""
    from dataclasses import replace

    from rpn_cli import Proposer
    from rpn_cli.inference.predict import run_model

    proposer = Proposer(DEFAULT_CHECKPOINT, device="cpu", backend="torch", precision="float32")
    outputs = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:count]:
        prepared = proposer.prepare(path)
        outputs.append((run_model(proposer.model, [prepared]), prepared.resized_size))
    times = []
    for _, changes in LAYER_VARIANTS:
        layer = replace(proposer.proposal_layer, settings=replace(proposer.proposal_layer.settings, **changes))
        times.append(_time(lambda: [layer(levels, 0, height, width) for levels, (width, height) in outputs],
                           repeats) / count)
    return times


def _boxes(kind: str, count: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * 600
    wh = torch.rand(count, 2, generator=generator) * 200 + 8
    boxes = torch.cat((xy, xy + wh), 1)
    if kind == "clustered":
        boxes = boxes[torch.randint(0, 20, (count,), generator=generator)] + torch.randn(count, 4, generator=generator) * 6
    return boxes


def _time(function, repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=3000)
    parser.add_argument("--keep", type=int, default=300)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.boxes} boxes, keep {args.keep}, IoU {args.iou}\n")
    print("| boxes | torchvision.ops.nms ms | greedy_nms ms | ratio | same result |")
    print("|---|---|---|---|---|")
    cases = []
    for kind in ("random", "clustered"):
        generator = torch.Generator().manual_seed(0)
        cases.append((kind, [(_boxes(kind, args.boxes, generator), torch.rand(args.boxes, generator=generator))]))
    if PHOTOS.is_dir():
        cases.append((f"rpn ({args.photos} photos)", _rpn_candidates(args.photos)))
    for kind, sets in cases:
        theirs = ours = 0.0
        same = True
        for boxes, scores in sets:
            theirs += _time(lambda b=boxes, s=scores: nms(b, s, args.iou)[: args.keep], args.repeats) / len(sets)
            ours += _time(lambda b=boxes, s=scores: greedy_nms(b, s, args.iou, args.keep), args.repeats) / len(sets)
            same &= torch.equal(nms(boxes, scores, args.iou)[: args.keep], greedy_nms(boxes, scores, args.iou, args.keep))
        print(f"| {kind} | {theirs * 1000:.1f} | {ours * 1000:.1f} | {theirs / ours:.1f}x | {same} |")
    if PHOTOS.is_dir():
        looped, one_pass, same = _batch_layer_times(args.batch, max(1, args.repeats // 4))
        print(f"\nProposal layer on a batch of {args.batch} photos, CPU: image by image {looped * 1000:.0f} ms, "
              f"one pass {one_pass * 1000:.0f} ms ({looped / one_pass:.2f}x); same boxes (within 0.001 px): {same}")
        times = _layer_times(args.photos, max(1, args.repeats // 4))
        print(f"\nProposal layer a photo ({args.photos} photos, image by image), CPU:\n")
        print("| settings | ms a photo |\n|---|---|")
        for (name, _), seconds in zip(LAYER_VARIANTS, times):
            print(f"| {name} | {seconds * 1000:.1f} |")


if __name__ == "__main__":
    main()
