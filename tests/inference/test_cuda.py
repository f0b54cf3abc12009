"""On a CUDA GPU (skipped elsewhere, with the reason): the GPU's records against the CPU's, reduced
precision's recall, flat memory, and pinned host memory for the copies. benchmarks/gpu_check.sh runs these."""

import numpy as np
import pytest
import torch
from conftest import SAMPLES

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))


def _matched(ours, theirs, atol):
    return np.isclose(ours.boxes.numpy(), theirs.boxes.numpy(), atol=atol).all(axis=1).mean()


def test_gpu_float32_records_equal_the_cpus(default_checkpoint):
    from rpn_cli import Proposer

    gpu = Proposer(default_checkpoint, device="cuda", precision="float32", backend="torch")
    cpu = Proposer(default_checkpoint, device="cpu", precision="float32", backend="torch")
    for path in SAMPLE_FILES:
        ours, theirs = gpu(path), cpu(path)
        # Different kernels sum in another order: scores agree to 1e-4 and boxes to 0.05 px, except
        # where nearly tied scores swap two boxes (at most 2% of them).
        assert len(ours.scores) == len(theirs.scores)
        np.testing.assert_allclose(ours.scores.numpy(), theirs.scores.numpy(), atol=1e-4)
        assert _matched(ours, theirs, 0.05) >= 0.98


def test_a_gpu_batch_in_one_pass_equals_image_by_image(default_checkpoint, monkeypatch):
    """A batch on the GPU goes through the proposal layer in one pass (ProposalLayer.for_batch): the same
    records as the per-image layer on the same outputs, up to float rounding (tests/model/test_proposals.py
    checks the same on the CPU)."""
    from rpn_cli import Proposer
    from rpn_cli.inference.predict import proposals_from_outputs, run_model
    from rpn_cli.model.proposals import ProposalLayer

    proposer = Proposer(default_checkpoint, device="cuda", precision="float32", backend="torch")
    prepared = [proposer.prepare(path) for path in SAMPLE_FILES]
    levels = run_model(proposer.model, prepared)
    calls = []
    one_pass = ProposalLayer.for_batch
    monkeypatch.setattr(ProposalLayer, "for_batch", lambda *args: calls.append(1) or one_pass(*args))
    batched = proposals_from_outputs(levels, prepared, proposer.proposal_layer)
    assert calls == [1]
    for index, (ours, image) in enumerate(zip(batched, prepared)):
        alone = proposals_from_outputs([_one_image(level, index) for level in levels], [image], proposer.proposal_layer)[0]
        assert ours.scores.shape == alone.scores.shape
        np.testing.assert_allclose(ours.scores.numpy(), alone.scores.numpy(), atol=1e-5)
        assert _matched(ours, alone, 0.01) >= 0.99


def _one_image(level, index):
    from dataclasses import replace

    return replace(level, logits=level.logits[index:index + 1], deltas=level.deltas[index:index + 1])


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_reduced_precision_keeps_average_recall(default_checkpoint, coco_dir, precision):
    from rpn_cli import Proposer
    from rpn_cli.evaluation.recall import average_recall_report, proposals_from_model
    from rpn_cli.io.datasets import load_coco

    images = load_coco(coco_dir / "instances.json")[:100]
    full = average_recall_report(images, proposals_from_model(
        Proposer(default_checkpoint, device="cuda", precision="float32"), images), (100, 300))
    reduced = average_recall_report(images, proposals_from_model(
        Proposer(default_checkpoint, device="cuda", precision=precision), images), (100, 300))
    for key in ("AR@100", "AR@300"):
        assert abs(reduced[key] - full[key]) < 0.005, (key, full[key], reduced[key])


def test_gpu_memory_stays_flat_over_thousands_of_images(default_checkpoint):
    from rpn_cli import Proposer

    proposer = Proposer(default_checkpoint, device="cuda")
    prepared = [proposer.prepare(path) for path in SAMPLE_FILES]
    peaks = []
    for rounds in (50, 750):  # 200, then 3,000 images
        torch.cuda.reset_peak_memory_stats()
        for _ in range(rounds):
            for image in prepared:
                proposer.propose_prepared([image])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.05 + (16 << 20), peaks


def test_host_to_gpu_copies_come_from_pinned_memory(default_checkpoint):
    """Pinned (page-locked) host memory is what lets a copy run while the GPU computes."""
    from torch.profiler import ProfilerActivity, profile

    from rpn_cli import Proposer

    proposer = Proposer(default_checkpoint, device="cuda")
    image = proposer.prepare(SAMPLE_FILES[0])
    proposer.propose_prepared([image])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        proposer.propose_prepared([image])
        torch.cuda.synchronize()
    copies = [event.name for event in trace.events() if "Memcpy HtoD" in event.name]
    assert copies and all("Pinned" in name for name in copies), copies
