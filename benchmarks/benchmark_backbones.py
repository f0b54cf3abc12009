"""Time a photo of checkpoints with different trunks, side by side in one run, for each way the CPU runs them.

    python benchmarks/benchmark_backbones.py CKPT [CKPT ...] [--images DIR] [--count 30] [--repeats 2]

For each of PyTorch float32, PyTorch bfloat16 (where the CPU has bfloat16 units), ONNX Runtime float32 and
ONNX Runtime int8 (a checkpoint's `<name>.int8.onnx` beside it, from `rpn export --format onnx-int8`;
left out where there is none), the in-process pipeline (`Proposer.stream`: decode, resize, network,
proposal layer) runs each checkpoint on the same photos, one after the other: best of --repeats, after
3 photos of warm-up. Recall of the same checkpoints: benchmarks/recall_vs_teacher.py --baseline.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark_propose import DEFAULT_IMAGES, _images, _machine  # noqa: E402

from rpn_cli import Proposer  # noqa: E402
from rpn_cli.inference.backends import cpu_has_bfloat16  # noqa: E402
from rpn_cli.io.checkpoint import read_spec  # noqa: E402

VARIANTS = (("PyTorch float32", "torch", "float32"), ("PyTorch bfloat16", "torch", "bfloat16"),
            ("ONNX Runtime float32", "onnxruntime", "auto"), ("ONNX Runtime int8", "int8", "auto"))


def _seconds_a_photo(checkpoint: Path, backend: str, precision: str, files: list[Path], repeats: int) -> float:
    proposer = Proposer(checkpoint, device="cpu", backend=backend, precision=precision)
    list(proposer.stream(files[:3]))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        list(proposer.stream(files))
        best = min(best, (time.perf_counter() - started) / len(files))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    files = _images(args.images, args.count)
    names = [f"{path.name} ({read_spec(path).backbone.name})" for path in args.checkpoints]
    print(f"Machine: {_machine()}\nImages: {len(files)} from {args.images}\n")
    print("| s / photo | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, backend, precision in VARIANTS:
        if precision == "bfloat16" and not cpu_has_bfloat16():
            continue
        cells = []
        for checkpoint in args.checkpoints:
            if backend == "int8":
                int8 = checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".int8.onnx")
                cells.append(f"{_seconds_a_photo(int8, 'auto', precision, files, args.repeats):.4f}"
                             if int8.is_file() else "(no int8 file)")
            else:
                cells.append(f"{_seconds_a_photo(checkpoint, backend, precision, files, args.repeats):.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
