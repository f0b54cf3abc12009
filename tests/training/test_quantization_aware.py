"""rpn train --quantization-aware: weights trained as the int8 model rounds them, and written rounded."""

import numpy as np
import pytest
import torch
from conftest import SAMPLES, run_rpn
from test_train import _small_spec, _synthetic_dataset

from rpn_cli.training.loop import TrainConfig, train
from rpn_cli.training.quantization import LEVELS, int8_rounded


def test_int8_rounding_is_per_channel_symmetric_in_7_bits_and_passes_gradients_through():
    weight = torch.tensor([[[[0.5]], [[-0.26]], [[0.1]]], [[[0.0]], [[0.0]], [[0.0]]]], requires_grad=True)
    fold = torch.tensor([2.0, 3.0])
    rounded = int8_rounded(weight, fold)
    # Channel 0 folded: 1.0, -0.52, 0.2 in steps of 1/64 -> 64, -33 (33.28), 13 (12.8) steps, unfolded.
    expected = torch.tensor([64, -33, 13]) / 64 / 2
    torch.testing.assert_close(rounded[0].flatten(), expected, rtol=0, atol=1e-7)
    assert rounded[1].abs().sum() == 0  # an all-zero channel stays zero
    (rounded * torch.arange(6.0).reshape(2, 3, 1, 1)).sum().backward()
    torch.testing.assert_close(weight.grad.flatten(), torch.arange(6.0))  # straight through
    # The rounding never moves a weight by more than half a step of its channel.
    other = torch.randn(8, 4, 3, 3)
    step = other.abs().amax(dim=(1, 2, 3), keepdim=True) / LEVELS
    assert ((int8_rounded(other) - other).abs() <= step / 2 + 1e-7).all()


def _trained(tmp_path, quantization_aware: bool):
    """A checkpoint whose BatchNorm layers fold by factors far from 1, fine-tuned for one epoch."""
    from rpn_cli.io.checkpoint import save_checkpoint
    from rpn_cli.model.network import RegionProposalNetwork

    torch.manual_seed(0)
    model = RegionProposalNetwork(_small_spec())
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.2, 5.0)
            module.running_mean.uniform_(-0.5, 0.5)
            module.weight.data.uniform_(0.5, 2.0)
    save_checkpoint(model, tmp_path / "start.safetensors")
    folder = tmp_path / "data"
    if not folder.exists():
        _synthetic_dataset(folder)
    name = "qat" if quantization_aware else "plain"
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / name), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, learning_rate=0.01,
                         init_checkpoint=str(tmp_path / "start.safetensors"), quantization_aware=quantization_aware)
    train(config, _small_spec(), torch.device("cpu"))
    return tmp_path / name / "final.safetensors"


def _int8_weights_against_float(checkpoint, tmp_path) -> list[float]:
    """Each quantized convolution's largest |int8 weight - float32 weight|, in steps of its channel, as
    ONNX Runtime quantizes the file's export (the oracle: its own rounding, BatchNorm folded by the export)."""
    import onnx
    from onnx import numpy_helper

    from rpn_cli.inference.quantize import quantize_onnx

    fp32, int8 = tmp_path / f"{checkpoint.parent.name}.onnx", tmp_path / f"{checkpoint.parent.name}.int8.onnx"
    assert run_rpn("export", checkpoint, fp32).returncode == 0
    quantize_onnx(fp32, int8, sorted(SAMPLES.glob("*.jpg")), method="minmax")
    floats = {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(fp32)).graph.initializer}
    quantized = {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(int8)).graph.initializer}
    distances = []
    for node in onnx.load(str(int8)).graph.node:
        source = node.input[0]
        if node.op_type != "DequantizeLinear" or quantized.get(source) is None or quantized[source].dtype != np.int8:
            continue
        name = source.removesuffix("_quantized")
        if floats.get(name) is None or floats[name].ndim != 4:
            continue  # a bias
        scale = quantized[node.input[1]].reshape(-1, 1, 1, 1)
        dequantized = quantized[source].astype(np.float32) * scale
        distances.append(float((np.abs(dequantized - floats[name]) / scale).max()))
    return distances


@pytest.mark.heavy
def test_the_written_weights_are_the_int8_models_own(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    # With --quantization-aware the int8 model holds the float32 weights exactly (up to float rounding in
    # the fold); without it they are up to half a step away, as rounding puts them.
    snapped = _int8_weights_against_float(_trained(tmp_path, True), tmp_path)
    plain = _int8_weights_against_float(_trained(tmp_path, False), tmp_path)
    assert len(snapped) == len(plain) > 40
    assert max(snapped) < 1e-3
    assert min(plain) > 0.3


def test_quantization_aware_training_needs_trained_weights(tmp_path):
    from rpn_cli.errors import UsageError

    folder = _synthetic_dataset(tmp_path / "data")
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], quantization_aware=True)
    with pytest.raises(UsageError, match="--quantization-aware fine-tunes trained weights"):
        train(config, _small_spec(), torch.device("cpu"))
    assert not (tmp_path / "work" / "final.safetensors").exists()
