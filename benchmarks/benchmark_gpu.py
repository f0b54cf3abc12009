"""End-to-end throughput on a GPU: photos a second from files to JSON records, and where the time goes.

    python benchmarks/benchmark_gpu.py [FOLDER] [--count 2000] [--batch-size 16] [--workers 8] [--precision auto]

FOLDER (default: ../shared/data/coco-train2017/images, else samples/) is cycled to ``--count`` images.
Decoding runs in ``--workers`` threads beside the GPU; batches hold consecutive images of one padded
size. Prints one JSON object: photos/s, seconds per stage (decode is the threads' own time, overlapped),
the GPU and the settings. Run by benchmarks/gpu_check.sh.
"""

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rpn_cli import Proposer  # noqa: E402
from rpn_cli.inference.engine import Timings  # noqa: E402
from rpn_cli.io.outputs import proposal_record  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco-train2017" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=COCO if COCO.is_dir() else ROOT / "samples")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import torch

    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    paths = [str(p) for p in itertools.islice(itertools.cycle(files), args.count)]
    proposer = Proposer(device=args.device, precision=args.precision)
    list(proposer.stream(paths[: args.batch_size * 2], batch_size=args.batch_size, workers=args.workers))  # warm-up
    timings, writing = Timings(), 0.0
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        for result in proposer.stream(paths, batch_size=args.batch_size, workers=args.workers, timings=timings):
            begun = time.perf_counter()
            sink.write(json.dumps(proposal_record(result.item.given, result.proposals)) + "\n")
            writing += time.perf_counter() - begun
    if proposer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "photos_per_second": round(len(paths) / seconds, 1), "images": len(paths), "seconds": round(seconds, 2),
        "stage_seconds": {"decode_in_threads": round(timings.decode, 2), "network": round(timings.model, 2),
                          "proposal_layer": round(timings.proposal_layer, 2), "writing": round(writing, 2)},
        "device": torch.cuda.get_device_name() if proposer.device.type == "cuda" else "cpu",
        "precision": getattr(proposer.model, "precision", "float32"), "batch_size": args.batch_size,
        "workers": args.workers, "folder": str(args.folder), "distinct_files": len(files),
    }))


if __name__ == "__main__":
    main()
