"""rpn train --quantization-aware: weights trained as the int8 model rounds them, and written rounded."""

import pytest
import torch
from conftest import SAMPLES, run_rpn
from int8_weights import int8_weight_distances
from test_train import _small_spec, _synthetic_dataset

from rpn_cli.model.int8_grid import INT8_WEIGHT_MAX
from rpn_cli.training.loop import TrainConfig, train
from rpn_cli.training.quantization import int8_rounded, make_quantization_aware


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
    step = other.abs().amax(dim=(1, 2, 3), keepdim=True) / INT8_WEIGHT_MAX
    assert ((int8_rounded(other) - other).abs() <= step / 2 + 1e-7).all()
    # Ties go to the even integer, as numpy's rounding in ONNX Runtime's quantizer; a channel that
    # BatchNorm multiplies by 0 keeps its weights.
    tie = torch.tensor([[[[1.0]]], [[[2.5 / 64]]], [[[1.0]]]]).reshape(1, 3, 1, 1).repeat(2, 1, 1, 1)
    rounded = int8_rounded(tie, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rounded[0].flatten(), torch.tensor([1.0, 2 / 64, 1.0]))
    torch.testing.assert_close(rounded[1], tie[1])


def test_the_convolutions_int8_quantizes_run_their_rounded_weights_folded_as_the_export_folds():
    from rpn_cli.model.network import RegionProposalNetwork

    torch.manual_seed(0)
    model = _with_uneven_batchnorm(RegionProposalNetwork(_small_spec())).eval()
    convolutions = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Conv2d}
    assert make_quantization_aware(model) == len(convolutions) - 2
    # The head's outputs stay float32 in the int8 model, so they train as they are.
    assert type(model.head.score) is torch.nn.Conv2d and type(model.head.loc) is torch.nn.Conv2d
    stem, norm = model.backbone.stages[0][0][0], model.backbone.stages[0][0][1]
    fold = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = stem.weight * fold.reshape(-1, 1, 1, 1)
    step = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 64
    expected = torch.clamp(torch.round(folded / step), -64, 64) * step / fold.reshape(-1, 1, 1, 1)
    inputs = torch.randn(1, 3, 32, 32)
    reference = torch.nn.functional.conv2d(inputs, expected, None, stem.stride, stem.padding)
    torch.testing.assert_close(stem(inputs), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stem.weight, expected)  # the parameter itself stays unrounded


def _with_uneven_batchnorm(model):
    """BatchNorm layers whose folding factors are far from 1, as a trained trunk's are."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.2, 5.0)
            module.running_mean.uniform_(-0.5, 0.5)
            module.weight.data.uniform_(0.5, 2.0)
    return model


def _trained(tmp_path, quantization_aware: bool):
    """A checkpoint whose BatchNorm layers fold by factors far from 1, fine-tuned for one epoch and
    written as the moving average of its weights."""
    from rpn_cli.io.checkpoint import save_checkpoint
    from rpn_cli.model.network import RegionProposalNetwork

    torch.manual_seed(0)
    save_checkpoint(_with_uneven_batchnorm(RegionProposalNetwork(_small_spec())), tmp_path / "start.safetensors")
    folder = tmp_path / "data"
    if not folder.exists():
        _synthetic_dataset(folder)
    name = "qat" if quantization_aware else "plain"
    config = TrainConfig(sources=[str(folder / "instances.json")], work_dir=str(tmp_path / name), epochs=1,
                         batch_size=2, validation_count=1, train_sizes=[128], warmup_steps=1, learning_rate=0.01,
                         init_checkpoint=str(tmp_path / "start.safetensors"), quantization_aware=quantization_aware,
                         ema_decay=0.9)
    train(config, _small_spec(), torch.device("cpu"))
    return tmp_path / name / "final.safetensors"


def _int8_weights_against_float(checkpoint, tmp_path) -> list[float]:
    """Each quantized convolution's largest |int8 weight - float32 weight|, in steps of its channel, as
    ONNX Runtime quantizes the file's export (the oracle: its own rounding, BatchNorm folded by the export)."""
    from rpn_cli.inference.quantize import quantize_onnx

    fp32, int8 = tmp_path / f"{checkpoint.parent.name}.onnx", tmp_path / f"{checkpoint.parent.name}.int8.onnx"
    assert run_rpn("export", checkpoint, fp32).returncode == 0
    quantize_onnx(fp32, int8, sorted(SAMPLES.glob("*.jpg")), method="minmax")
    return int8_weight_distances(fp32, int8)


def test_the_file_holds_the_averaged_weights_rounded_and_a_plain_run_does_not(tmp_path):
    from rpn_cli.io.checkpoint import load_checkpoint
    from rpn_cli.model.folding import conv_batchnorm_pairs

    def distances(path):
        """Each BatchNorm-fed convolution's largest distance, in steps, of its folded weights to an integer."""
        model = load_checkpoint(path, "cpu").eval()
        found = []
        for parent, conv, norm in conv_batchnorm_pairs(model):
            conv, norm = parent._modules[conv], parent._modules[norm]
            folded = conv.weight.detach() * (norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)).reshape(-1, 1, 1, 1)
            scaled = folded / (folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 64)
            found.append(float((scaled - scaled.round()).abs().max()))
        return found

    snapped, plain = distances(_trained(tmp_path, True)), distances(_trained(tmp_path, False))
    assert len(snapped) == len(plain) > 40
    assert max(snapped) < 1e-3 and min(plain) > 0.3


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

    # Refused before the data is read (there is none here) or anything is written.
    config = TrainConfig(sources=[str(tmp_path / "missing.json")], work_dir=str(tmp_path / "work"), epochs=1,
                         quantization_aware=True)
    with pytest.raises(UsageError, match="--quantization-aware fine-tunes trained weights"):
        train(config, _small_spec(), torch.device("cpu"))
    assert not (tmp_path / "work").exists()
