"""AR of a checkpoint on the validation set with the network in float32 and bfloat16 (PyTorch), float32 and int8
(ONNX Runtime).

    python benchmarks/recall_by_precision.py [--checkpoint CKPT] [--annotations FILE]

A precision or backend is what auto picks only while AR@100 and AR@300 move by less than 0.005.
Default images: the validation set of benchmarks/validation_set.py.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli import Proposer, RpnError  # noqa: E402
from rpn_cli.evaluation.recall import average_recall_report, proposals_from_model  # noqa: E402
from rpn_cli.inference.backends import cpu_has_bfloat16  # noqa: E402
from rpn_cli.io.datasets import load_coco  # noqa: E402
from rpn_cli.weights import DEFAULT_CHECKPOINT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--annotations", type=Path, help="A COCO file to score on instead of the validation set.")
    args = parser.parse_args()
    if args.annotations:
        images = load_coco(args.annotations)
    else:
        from validation_set import validation_images

        images = validation_images()
    print(f"{len(images)} images")
    print("| network | AR@10 | AR@100 | AR@300 | AR@100 - float32 | AR@300 - float32 | s / image (whole eval) |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for backend, precision in (("torch", "float32"), ("torch", "bfloat16"), ("onnxruntime", "auto"),
                               ("onnxruntime-int8", "auto")):
        if precision == "bfloat16" and not cpu_has_bfloat16():
            # Emulated there: 18 times PyTorch float32's time on the Zen 3 measured (README "Performance"); never auto's.
            print(f"| {backend} {precision} | not run: this CPU has no native bfloat16 |")
            continue
        try:
            proposer = Proposer(args.checkpoint, device="cpu", precision=precision, backend=backend)
        except RpnError as error:
            print(f"| {backend} {precision} | not run: {error} |")
            continue
        started = time.perf_counter()
        found = proposals_from_model(proposer, images)
        seconds = (time.perf_counter() - started) / len(images)
        report = average_recall_report(images, found, (10, 100, 300))
        reference = reference or report
        print(f"| {backend} {proposer.model.precision} | {report['AR@10']:.4f} | {report['AR@100']:.4f} | "
              f"{report['AR@300']:.4f} | {report['AR@100'] - reference['AR@100']:+.4f} | "
              f"{report['AR@300'] - reference['AR@300']:+.4f} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
