"""Side-by-side timing of `rpn propose`, Selective Search and the seed's own RPN code, in one run.

    python benchmarks/benchmark_propose.py [--images DIR] [--count 50] [--checkpoint CKPT] [--repeats 3]
                                           [--seed-weights C4_CKPT] [--skip PART,...]

Each part runs in its own process (so each has its own peak memory) on the same images:
  ours-cli   `rpn propose DIR --out TMP --format json` end to end, as a user runs it (process start included);
             run again on the first 5 images (ours-cli-start): the difference over the other images is the
             marginal time a photo over a folder, start-up excluded
  ours-split the same pipeline in-process, timed per stage (decode+resize, model, proposal layer, writing),
             as auto runs it (lanes included) and one image at a time, with each backend and precision
             (PyTorch float32 and bfloat16, ONNX Runtime float32 and int8) and --batch-size 4 (skip them all
             with --skip ours-split)
  selective  OpenCV's Selective Search, fast mode (needs the bench extra: opencv-contrib-python-headless)
  seed       the seed document's RPN code (tests/seed_reference.py), one image at a time, float32,
             ResNet-50 C4 in the seed project's layout: random weights, or --seed-weights CKPT's
  ours-c4    our `resnet50-c4` on a checkpoint converted from that same state dict, as `rpn propose`
             runs it (precision auto: bfloat16 on CPUs that have it) and in float32
  ray        `rpn propose --engine ray` on the same images (local Ray, all cores; needs the ray extra),
             against ours-cli: the Ray engine's overhead on one machine
Prints a Markdown report (and --json FILE writes the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco-train2017" / "images"


def _images(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if not files:
        sys.exit(f"{folder}: no images")
    return files


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_ours_split(files, checkpoint, out_dir, backend="auto", precision="auto", batch_size=1, lanes=None, **_):
    import torch

    from rpn_cli import Proposer
    from rpn_cli.inference.engine import Timings
    from rpn_cli.io.inputs import expand_inputs
    from rpn_cli.io.outputs import write_image_outputs

    proposer = Proposer(checkpoint, device="cpu", backend=backend, precision=precision)  # defaults: as rpn propose
    items = expand_inputs([str(f) for f in files])
    # Warm-up: first-call allocations, a first ONNX build, the lanes' sessions.
    list(proposer.stream(items[:2], workers=0, batch_size=batch_size, lanes=lanes))
    timings, writing = Timings(), 0.0
    started = time.perf_counter()
    for result in proposer.stream(items, workers=0, timings=timings, batch_size=batch_size, lanes=lanes):
        begun = time.perf_counter()
        write_image_outputs(Path(out_dir), result, ["json"], 0)
        writing += time.perf_counter() - begun
    total = time.perf_counter() - started
    return {"seconds": total, "images": len(files), "lanes": timings.lanes, "decode": timings.decode,
            "model": timings.model, "proposal_layer": timings.proposal_layer, "writing": writing,
            "threads": torch.get_num_threads(),
            "engine": f"{type(proposer.model).__name__} {getattr(proposer.model, 'precision', 'float32')}"}


def _timed_propose(files, checkpoint, out_dir, *options) -> dict:
    """`rpn propose - --out DIR OPTIONS` on the files, timed as a whole process."""
    listing = "\n".join(str(f) for f in files) + "\n"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rpn_cli", "propose", "-", "--checkpoint", str(checkpoint), "--out",
                    str(out_dir), "--quiet", *options], input=listing, text=True, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "images": len(files), "peak_mib": child_peak}


def part_ours_cli(files, checkpoint, out_dir, **_):
    return _timed_propose(files, checkpoint, out_dir, "--format", "json")


START_IMAGES = 5  # ours-cli-start: the start-up and these, subtracted from ours-cli for the marginal time


def part_ours_cli_start(files, checkpoint, out_dir, **_):
    return _timed_propose(files[:START_IMAGES], checkpoint, out_dir, "--format", "json")


def part_ray(files, checkpoint, out_dir, **_):
    return _timed_propose(files, checkpoint, out_dir, "--engine", "ray")


def part_selective(files, **_):
    import cv2

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    counts = []
    started = time.perf_counter()
    for path in files:
        image = cv2.imread(str(path))
        search.setBaseImage(image)
        search.switchToSelectiveSearchFast()
        counts.append(len(search.process()))
    return {"seconds": time.perf_counter() - started, "images": len(files), "mean_boxes": sum(counts) / len(counts)}


def _seed_state_dict(path: Path, weights: Path | None) -> None:
    """A seed-project state dict: the weights of ``weights`` (a resnet50-c4 checkpoint of ours in the
    seed project's conventions) or, without it, ResNet-50 C4 (random, seed 0) and the seed's head with
    its N(0, 0.01) init."""
    import torch

    from rpn_cli.io.checkpoint import load_checkpoint
    from rpn_cli.model.network import RegionProposalNetwork
    from rpn_cli.model.spec import seed_project_spec

    if weights is None:
        torch.manual_seed(0)
        model = RegionProposalNetwork(seed_project_spec())
    else:
        model = load_checkpoint(weights, "cpu")
    state = {"extractor." + k[len("backbone.body."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state.update({"rpn." + k[len("head."):]: v for k, v in model.state_dict().items() if k.startswith("head.")})
    torch.save(state, path)


def _check_seed_weights(path: Path) -> None:
    """Stop before any part runs unless ``path`` is a resnet50-c4 checkpoint in the seed project's conventions."""
    from rpn_cli.errors import RpnError
    from rpn_cli.io.checkpoint import read_spec
    from rpn_cli.model.spec import seed_project_spec

    try:
        spec = read_spec(path)
    except RpnError as error:
        sys.exit(f"--seed-weights: {error}")
    seed_spec = seed_project_spec()
    if (spec.backbone, spec.levels, spec.score) != (seed_spec.backbone, seed_spec.levels, seed_spec.score):
        sys.exit(f"--seed-weights {path}: not a resnet50-c4 checkpoint in the seed project's conventions "
                 "(rpn train --backbone resnet50-c4 writes one)")
    if spec.preprocess != seed_spec.preprocess:
        print(f"warning: {path} was trained for other preprocessing ({spec.preprocess.size} px); "
              "both codes run it as the seed's (600 px)", file=sys.stderr)


def part_seed(files, seed_state, **_):
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from seed_reference import SeedHead, seed_extractor, seed_rpn_proposals

    state = torch.load(seed_state, weights_only=True)
    extractor, rpn = seed_extractor().eval(), SeedHead().eval()
    extractor.load_state_dict({k[len("extractor."):]: v for k, v in state.items() if k.startswith("extractor.")})
    rpn.load_state_dict({k[len("rpn."):]: v for k, v in state.items() if k.startswith("rpn.")})
    results = {}
    started = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB")
        rois, _, size = seed_rpn_proposals(image, extractor, rpn)
        scale = torch.tensor([size[0] / image.width, size[1] / image.height] * 2)
        results[str(path)] = (rois / scale).tolist()
    return {"seconds": time.perf_counter() - started, "images": len(files), "boxes": results}


def part_ours_c4(files, c4_checkpoint, precision, **_):
    from rpn_cli import Proposer

    proposer = Proposer(c4_checkpoint, device="cpu", precision=precision)  # as rpn propose --precision runs it
    started = time.perf_counter()
    results = {r.item.given: r.proposals.boxes.tolist() for r in proposer.stream(files)}
    return {"seconds": time.perf_counter() - started, "images": len(files), "boxes": results,
            "precision": proposer.model.precision}


# In-process variants of the local pipeline: the backend and precision auto picks, and the others.
SPLIT_VARIANTS = {
    "ours-split": ({}, "rpn propose pipeline, in-process (auto: as rpn propose runs)"),
    "ours-split-one-at-a-time": ({"lanes": 1}, "  the same, auto, one image at a time (--lanes 1)"),
    "ours-split-torch-float32": ({"backend": "torch", "precision": "float32"}, "  the same, PyTorch float32"),
    "ours-split-torch-bfloat16": ({"backend": "torch", "precision": "bfloat16"}, "  the same, PyTorch bfloat16"),
    "ours-split-onnxruntime": ({"backend": "onnxruntime"}, "  the same, ONNX Runtime float32"),
    "ours-split-onnxruntime-int8": ({"backend": "onnxruntime-int8"}, "  the same, ONNX Runtime int8"),
    "ours-split-batch4": ({"batch_size": 4}, "  the same, auto, --batch-size 4"),
}

PARTS = {"ours-split": part_ours_split, "ours-cli": part_ours_cli, "ours-cli-start": part_ours_cli_start,
         "selective": part_selective,
         "seed": part_seed, "ours-c4": part_ours_c4, "ray": part_ray}


def _run_part(name: str, arguments: dict) -> dict:
    """Run one part in a fresh process and return its figures plus that process's peak memory."""
    result = subprocess.run([sys.executable, __file__, "--part", name, "--part-args", json.dumps(arguments)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise RuntimeError(f"part {name} failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def _matched_share(seed_boxes: dict, our_boxes: dict) -> float:
    import torch
    from torchvision.ops import box_iou

    matched = total = 0
    for image, boxes in seed_boxes.items():
        seed = torch.tensor(boxes).reshape(-1, 4)
        ours = torch.tensor(our_boxes.get(image, [])).reshape(-1, 4)
        total += seed.shape[0]
        if seed.shape[0] and ours.shape[0]:
            matched += int((box_iou(seed, ours).max(dim=1).values >= 0.95).sum())
    return matched / max(total, 1)


def _machine() -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), []))
    features = ", ".join(f"{name} {'yes' if flag in flags else 'no'}"
                         for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"),
                                            ("AMX", "amx_bf16")))
    return (f"{model}, {os.cpu_count()} cores ({features}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--seed-weights", type=Path,
                        help="A resnet50-c4 checkpoint of ours (rpn train --backbone resnet50-c4) whose weights the "
                             "seed's code and ours both run, in the seed project's layout; default: random weights.")
    parser.add_argument("--skip", default="", help="Comma-separated parts to leave out.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of the ours-cli and ours-split parts (median kept).")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-args", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.part:
        arguments = json.loads(args.part_args)
        arguments["files"] = [Path(f) for f in arguments["files"]]
        figures = PARTS[args.part](**arguments)
        figures.setdefault("peak_mib", _peak_mib())
        print(json.dumps(figures))
        return

    if args.seed_weights and "seed" not in set(args.skip.split(",")):
        _check_seed_weights(args.seed_weights)
    files = _images(args.images, args.count)
    skip = set(filter(None, args.skip.split(",")))
    figures: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        common = {"files": [str(f) for f in files], "checkpoint": str(args.checkpoint)}
        names = [name for name in ("ours-cli", "ours-cli-start", *SPLIT_VARIANTS, "selective", "ray")
                 if name not in skip and not (name.startswith("ours-split-") and "ours-split" in skip) and not (
                     name == "ours-cli-start" and ("ours-cli" in skip or len(files) <= START_IMAGES))]
        # Our parts take seconds and vary run to run by 10% and more: the median of --repeats runs, taken
        # in rounds over every part, so that a slow spell of the machine falls on all of them alike.
        runs: dict[str, list] = {name: [] for name in names}
        for attempt in range(args.repeats):
            for name in names:
                part, options = ("ours-split", SPLIT_VARIANTS[name][0]) if name in SPLIT_VARIANTS else (name, {})
                if attempt and part not in ("ours-cli", "ours-cli-start", "ours-split"):
                    continue
                out_dir = scratch / f"{name}-{attempt}"
                out_dir.mkdir()
                print(f"running {name} on {len(files)} images (round {attempt + 1})...", file=sys.stderr)
                runs[name].append(_run_part(part, {**common, **options, "out_dir": str(out_dir)}))
        for name in names:
            ordered = sorted(runs[name], key=lambda run: run["seconds"])
            figures[name] = {**ordered[len(ordered) // 2], "runs_seconds": [round(run["seconds"], 2) for run in ordered]}
        if "seed" not in skip:
            from rpn_cli.io.converters import convert_seed_project

            seed_state, c4 = scratch / "seed.pth", scratch / "seed.safetensors"
            _seed_state_dict(seed_state, args.seed_weights)
            convert_seed_project(seed_state, c4)
            print("running the seed's code and our resnet50-c4...", file=sys.stderr)
            figures["seed"] = _run_part("seed", {**common, "seed_state": str(seed_state)})
            figures["seed"]["weights"] = str(args.seed_weights) if args.seed_weights else "random (seed 0)"
            seed_boxes = figures["seed"].pop("boxes")
            for name, precision in (("ours-c4", "auto"), ("ours-c4-float32", "float32")):
                figures[name] = _run_part("ours-c4", {**common, "c4_checkpoint": str(c4), "precision": precision})
                figures[name]["matched_share"] = _matched_share(seed_boxes, figures[name].pop("boxes"))
    report(figures, files, args.images)
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine(), **figures}, indent=2))


def report(figures: dict, files: list, folder: Path) -> None:
    def per_image(name):
        return figures[name]["seconds"] / figures[name]["images"]

    print(f"Machine: {_machine()}")
    print(f"Images: {len(files)} from {folder}")
    if "seed" in figures:
        print(f"Seed-project weights: {figures['seed']['weights']}")
    print()
    print("| what | s / image | images / s | peak MiB |")
    print("|---|---|---|---|")
    for name, label in (("ours-cli", "rpn propose (default checkpoint), end to end incl. start-up"),
                        *((name, label) for name, (_, label) in SPLIT_VARIANTS.items()),
                        ("selective", "Selective Search (OpenCV, fast)"),
                        ("ray", "rpn propose --engine ray (local Ray), end to end incl. start-up"),
                        ("seed", "seed's RPN code, ResNet-50 C4"),
                        ("ours-c4", "our resnet50-c4, same weights, as rpn propose runs it"),
                        ("ours-c4-float32", "our resnet50-c4, same weights, --precision float32")):
        if name in figures:
            print(f"| {label} | {per_image(name):.3f} | {1 / per_image(name):.2f} | {figures[name]['peak_mib']:.0f} |")
    print()
    if "selective" in figures and "ours-cli" in figures:
        print(f"- Selective Search / rpn propose end to end: {per_image('selective') / per_image('ours-cli'):.1f}x "
              f"(rpn propose runs, seconds for {len(files)} images: {figures['ours-cli']['runs_seconds']})")
    if "selective" in figures and "ours-cli-start" in figures:
        start = figures["ours-cli-start"]
        marginal = (figures["ours-cli"]["seconds"] - start["seconds"]) / (figures["ours-cli"]["images"] - start["images"])
        figures["ours-cli-marginal"] = {"seconds_per_image": marginal}
        print(f"- Selective Search / rpn propose end to end, marginal (start-up excluded): "
              f"{per_image('selective') / marginal:.1f}x ({marginal:.3f} s a photo: {len(files)} photos in "
              f"{figures['ours-cli']['seconds']:.2f} s, the first {start['images']} in {start['seconds']:.2f} s)")
    for name, (_, label) in SPLIT_VARIANTS.items():
        if "selective" in figures and name in figures:
            print(f"- Selective Search / {label.strip()} ({figures[name]['engine']}): "
                  f"{per_image('selective') / per_image(name):.1f}x")
    if "ray" in figures and "ours-cli" in figures:
        overhead = figures["ray"]["seconds"] - figures["ours-cli"]["seconds"]
        print(f"- Ray engine / local engine, wall time: {figures['ray']['seconds'] / figures['ours-cli']['seconds']:.2f}x "
              f"({overhead:+.1f} s for {len(files)} images)")
    for name in ("ours-c4", "ours-c4-float32"):
        if name in figures:
            print(f"- seed code / our resnet50-c4 ({figures[name]['precision']}): "
                  f"{per_image('seed') / per_image(name):.2f}x; seed boxes matched by ours at IoU >= 0.95: "
                  f"{figures[name]['matched_share']:.1%}")
    for name, (_, label) in SPLIT_VARIANTS.items():
        if name in figures:
            split = figures[name]
            parts = {k: split[k] for k in ("decode", "model", "proposal_layer", "writing")}
            total = sum(parts.values())
            lanes = f" ({split['lanes']} lanes: seconds summed over them)" if split.get("lanes", 1) > 1 else ""
            print(f"- time per image by stage, {label.strip()}{lanes}: " + ", ".join(
                f"{k} {1000 * v / split['images']:.1f} ms ({v / total:.0%})" for k, v in parts.items()))


if __name__ == "__main__":
    main()
