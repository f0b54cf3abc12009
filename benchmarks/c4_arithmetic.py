"""How close ResNet-50 C4 runs to this CPU's arithmetic peak, in float32 and bfloat16.

    python benchmarks/c4_arithmetic.py [--height 600 --width 800] [--repeats 5]

Counts the network's multiply-adds (every convolution, from its output size), times our
`resnet50-c4` network as `rpn propose` runs it (BatchNorm folded, channels-last) and the seed
document's extractor + head as its code runs them (float32, BatchNorm as layers), and times a
large matrix product (2048 x 2048 x 2048) as the attainable peak. If our float32 network already
runs near that peak, no float32 implementation of the same arithmetic can be much faster: a
larger speed-up needs fewer multiply-adds or a cheaper number format.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from seed_reference import SeedHead, seed_extractor  # noqa: E402

from rpn_cli.inference.runtime import load_model  # noqa: E402
from rpn_cli.io.checkpoint import save_checkpoint  # noqa: E402
from rpn_cli.model.network import RegionProposalNetwork
from rpn_cli.model.spec import seed_project_spec  # noqa: E402


def multiply_adds(modules: nn.Module, run, images: torch.Tensor) -> int:
    """Multiply-adds of every ``nn.Conv2d`` in ``modules`` while ``run(images)`` runs once."""
    total = 0

    def count(conv: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        per_output = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in modules.modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        run(images)
    for hook in hooks:
        hook.remove()
    return total


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(1, 3, args.height, args.width)
    extractor, head = seed_extractor().eval(), SeedHead().eval()

    def seed_network(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The seed's network as its code runs it (tests/seed_reference.py)."""
        hidden = torch.relu(head.conv1(extractor(x)))
        return head.score(hidden), head.loc(hidden)

    macs = multiply_adds(nn.ModuleList([extractor, head]), seed_network, images)
    print(f"ResNet-50 C4 + RPN head at {args.height} x {args.width}: {macs / 1e9:.1f} G multiply-adds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| what | ms | GFLOP/s | share of the matrix product's |")
    print("|---|---|---|---|")
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.rand(2048, 2048, dtype=dtype), torch.rand(2048, 2048, dtype=dtype)
        seconds = median_seconds(lambda: a @ b, args.repeats)
        peaks[dtype] = 2 * 2048 ** 3 / seconds
        print(f"| matrix product 2048^3, {str(dtype)[6:]} | {seconds * 1e3:.1f} | {peaks[dtype] / 1e9:.0f} | 100% |")

    def row(label: str, seconds: float, dtype: torch.dtype) -> None:
        rate = 2 * macs / seconds
        print(f"| {label} | {seconds * 1e3:.0f} | {rate / 1e9:.0f} | {rate / peaks[dtype]:.0%} |")

    with torch.inference_mode():
        row("the seed's code, float32", median_seconds(lambda: seed_network(images), args.repeats), torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "c4.safetensors"
        save_checkpoint(RegionProposalNetwork(seed_project_spec()), checkpoint)
        for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = load_model(checkpoint, "cpu", precision)
            batch = images.to(model.dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                row(f"our resnet50-c4 network, {precision}", median_seconds(lambda: model.raw_outputs(batch), args.repeats),
                    dtype)


if __name__ == "__main__":
    main()
