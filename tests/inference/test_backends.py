"""ONNX Runtime as a backend: the same proposals as PyTorch, built once into the cache, chosen by auto."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from rpn_cli.errors import UsageError
from rpn_cli.inference import backends

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
OURS, EXPORTED = Path("model.safetensors"), Path("model.onnx")


@pytest.mark.parametrize("bfloat16, onnx_extra, device, precision, checkpoint, expected", [
    (True, True, CPU, "auto", OURS, "torch"),            # bfloat16 PyTorch is the fastest there
    (False, True, CPU, "auto", OURS, "onnxruntime"),     # no bfloat16: ONNX Runtime's float32
    (False, True, CPU, "float32", OURS, "onnxruntime"),
    (False, False, CPU, "auto", OURS, "torch"),          # without the onnx extra
    (False, True, CUDA, "auto", OURS, "torch"),
    (False, True, CPU, "bfloat16", OURS, "torch"),       # asked for a precision ONNX Runtime does not run
    (False, True, CPU, "auto", EXPORTED, "onnxruntime"), # an exported file runs as what it is
    (True, True, CPU, "auto", Path("model.onnx"), "onnxruntime"),
    (False, True, CPU, "auto", Path("model.ts"), "torch"),
])
def test_auto_picks_by_the_cpus_features(monkeypatch, bfloat16, onnx_extra, device, precision, checkpoint, expected):
    monkeypatch.setattr(backends, "cpu_has_bfloat16", lambda: bfloat16)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: onnx_extra)
    assert backends.resolve_backend("auto", device, precision, checkpoint) == expected


@pytest.mark.parametrize("bfloat16, device, precision, expected", [
    (True, CPU, "auto", "onnxruntime-int8"),    # int8 beats bfloat16 PyTorch where both exist
    (False, CPU, "auto", "onnxruntime-int8"),
    (False, CPU, "float32", "onnxruntime"),     # asked for float32: not int8
    (True, CPU, "bfloat16", "torch"),
    (False, CUDA, "auto", "torch"),             # int8 here is a CPU model
])
def test_auto_picks_int8_where_the_checkpoint_has_it(monkeypatch, bfloat16, device, precision, expected):
    monkeypatch.setattr(backends, "cpu_has_bfloat16", lambda: bfloat16)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    monkeypatch.setattr(backends, "int8_model_for", lambda checkpoint: Path("model.int8.onnx"))
    assert backends.resolve_backend("auto", device, precision, OURS) == expected


def test_the_shipped_int8_model_goes_with_the_shipped_checkpoints_bytes(tmp_path, small_checkpoint):
    from conftest import DEFAULT_CHECKPOINT

    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    assert backends.int8_model_for(DEFAULT_CHECKPOINT) == backends.DEFAULT_INT8
    assert backends.int8_model_for(copy) == backends.DEFAULT_INT8
    assert backends.int8_model_for(small_checkpoint) is None
    with pytest.raises(UsageError, match="runs on the CPU"):
        backends.resolve_backend("onnxruntime-int8", CUDA, "auto", OURS)
    with pytest.raises(UsageError, match="runs int8, not --precision float16"):
        backends.resolve_backend("onnxruntime-int8", CPU, "float16", OURS)


@pytest.mark.parametrize("checkpoint, backend, precision, refusal", [
    (EXPORTED, "torch", "auto", "model.onnx: an exported file runs in ONNX Runtime, not --backend torch"),
    (Path("model.pt"), "onnxruntime", "auto", "model.pt: an exported file runs in PyTorch, not --backend onnxruntime"),
    (EXPORTED, "auto", "bfloat16", "model.onnx: an exported file runs as it was exported, not in --precision bfloat16"),
    (Path("model.ts"), "torch", "float16", "as it was exported, not in --precision float16"),
    (EXPORTED, "onnxruntime-int8", "auto", "is for our .safetensors checkpoints"),
])
def test_an_exported_file_refuses_another_backend_or_precision(checkpoint, backend, precision, refusal):
    with pytest.raises(UsageError, match=re.escape(refusal)):
        backends.resolve_backend(backend, CPU, precision, checkpoint)


def test_an_exported_file_runs_in_its_own_engine_when_asked_for_it():
    assert backends.resolve_backend("onnxruntime", CPU, "float32", EXPORTED) == "onnxruntime"
    assert backends.resolve_backend("torch", CPU, "auto", Path("model.pt")) == "torch"


def test_explicit_backends_and_refusals(monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert backends.resolve_backend("torch", CPU, "auto", OURS) == "torch"
    with pytest.raises(UsageError, match="needs the onnx extra"):
        backends.resolve_backend("onnxruntime", CPU, "auto", OURS)
    with pytest.raises(UsageError, match="runs float32, not --precision bfloat16"):
        backends.resolve_backend("onnxruntime", CPU, "bfloat16", OURS)
    with pytest.raises(UsageError, match="--backend tensorrt: choose from"):
        backends.resolve_backend("tensorrt", CPU, "auto", OURS)


@pytest.mark.heavy  # exports the model to ONNX: ~25 s
def test_onnxruntime_gives_pytorchs_proposals_and_builds_once(small_checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rpn_cli import Proposer, cli

    monkeypatch.setenv("RPN_CACHE_DIR", str(tmp_path / "cache"))
    command = ["propose", str(SAMPLES / "chelsea.jpg"), "-c", str(small_checkpoint), "--backend", "onnxruntime"]
    assert cli.app.run(command) == 0
    assert "note: building the ONNX Runtime model of random.safetensors once" in capsys.readouterr().err
    (built,) = (tmp_path / "cache" / "onnx").glob("*.onnx")
    stamp = built.stat().st_mtime_ns
    reference = Proposer(small_checkpoint, device="cpu", precision="float32", backend="torch")
    fast = Proposer(small_checkpoint, device="cpu", backend="onnxruntime")
    assert cli.app.run(command) == 0 and "note:" not in capsys.readouterr().err
    assert built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    for path in sorted(SAMPLES.glob("*.jpg")):
        ours, theirs = fast(path), reference(path)
        assert len(ours.scores) == len(theirs.scores)
        # Outputs agree to ~1e-5; boxes whose scores nearly tie may swap places, nothing else moves.
        np.testing.assert_allclose(ours.scores.numpy(), theirs.scores.numpy(), atol=1e-4)
        matched = np.isclose(ours.boxes.numpy(), theirs.boxes.numpy(), atol=0.02).all(axis=1)
        assert matched.mean() >= 0.98


def test_auto_falls_back_to_pytorch_when_the_export_cannot_be_built(small_checkpoint, monkeypatch, tmp_path):
    from rpn_cli.errors import RpnError
    from rpn_cli.inference.runtime import load_model
    from rpn_cli.model.network import RegionProposalNetwork

    monkeypatch.setattr(backends, "cpu_has_bfloat16", lambda: False)
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: True)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RPN_CACHE_DIR", str(tmp_path / "a-file"))  # no folder can be made there
    assert isinstance(load_model(small_checkpoint, "cpu", "auto", backend="auto"), RegionProposalNetwork)
    with pytest.raises(RpnError, match="cannot write|could not be built"):
        load_model(small_checkpoint, "cpu", "auto", backend="onnxruntime")
