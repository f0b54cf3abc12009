"""GPTQ rounding of the int8 model's weights (`rpn export --format onnx-int8 --weight-rounding gptq`)."""

import numpy as np
import pytest
import torch
from conftest import DEFAULT_CHECKPOINT, SAMPLES, run_rpn
from int8_weights import int8_weight_distances

from rpn_cli.inference.quantize import model_input
from rpn_cli.inference.weight_rounding import (
    DAMPING,
    gptq_integers,
    input_hessians,
    round_weights_gptq,
)
from rpn_cli.io.checkpoint import load_checkpoint
from rpn_cli.model.int8_grid import (
    INT8_WEIGHT_MAX,
    batchnorm_fold_factor,
    channel_steps,
    quantized_convolutions,
)


def _optimal_brain_quantization(weight: np.ndarray, hessian: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The oracle, OBQ's greedy step written out (Frantar & Alistarh 2022, eq. 2-3) for one group: round
    one column, spread its error over the others through the inverse Hessian, then eliminate that column
    from the inverse; GPTQ computes the same with a Cholesky factor instead. weight (R, K), step (R,)."""
    weight, hessian = weight.copy(), hessian.copy()
    diagonal = np.diagonal(hessian).copy()
    diagonal[diagonal == 0] = 1.0
    np.fill_diagonal(hessian, diagonal + DAMPING * diagonal.mean())
    inverse = np.linalg.inv(hessian)
    integers = np.zeros_like(weight)
    for column in np.argsort(-diagonal, kind="stable"):
        integers[:, column] = np.clip(np.round(weight[:, column] / step), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX)
        error = (weight[:, column] - integers[:, column] * step) / inverse[column, column]
        weight -= np.outer(error, inverse[column])
        inverse -= np.outer(inverse[:, column], inverse[column]) / inverse[column, column]
    return integers


@pytest.mark.parametrize("block", [7, 128])  # lazy blocks of 7 columns: three blocks, the last one short
def test_gptq_integers_equal_optimal_brain_quantization_written_out(block, monkeypatch):
    from rpn_cli.inference import weight_rounding

    monkeypatch.setattr(weight_rounding, "BLOCK", block)
    generator = torch.Generator().manual_seed(3)
    groups, rows, columns = 3, 6, 20
    # Inputs driven by a few shared factors, as neighbouring pixels and channels are: where GPTQ and
    # nearest rounding part.
    factors = torch.randn(groups, 4, 200, generator=generator, dtype=torch.float64)
    mixing = torch.randn(groups, columns, 4, generator=generator, dtype=torch.float64)
    inputs = mixing @ factors + 0.05 * torch.randn(groups, columns, 200, generator=generator, dtype=torch.float64)
    inputs[2, 5] = 0  # an input that is always 0
    hessian = inputs @ inputs.transpose(1, 2)
    weight = torch.randn(groups, rows, columns, generator=generator, dtype=torch.float64)
    step = weight.abs().amax(dim=2, keepdim=True) / INT8_WEIGHT_MAX
    ours = gptq_integers(weight, hessian, step)
    for group in range(groups):
        expected = _optimal_brain_quantization(weight[group].numpy(), hessian[group].numpy(), step[group, :, 0].numpy())
        np.testing.assert_array_equal(ours[group].numpy(), expected)
    nearest = torch.clamp(torch.round(weight / step), -INT8_WEIGHT_MAX, INT8_WEIGHT_MAX)
    assert (ours != nearest).float().mean() > 0.1
    assert ours.abs().max() <= INT8_WEIGHT_MAX


def _patch_products(inputs: np.ndarray, conv: torch.nn.Conv2d) -> np.ndarray:
    """The oracle for one image: sum of patch patchᵀ, each patch cut out position by position, (G, K, K)."""
    (pad_y, pad_x), (stride_y, stride_x), (size_y, size_x) = conv.padding, conv.stride, conv.kernel_size
    padded = np.pad(inputs[0], ((0, 0), (pad_y, pad_y), (pad_x, pad_x)))
    channels = inputs.shape[1] // conv.groups
    total = np.zeros((conv.groups, channels * size_y * size_x, channels * size_y * size_x))
    for top in range(0, padded.shape[1] - size_y + 1, stride_y):
        for left in range(0, padded.shape[2] - size_x + 1, stride_x):
            patch = padded[:, top:top + size_y, left:left + size_x].reshape(conv.groups, -1)
            total += patch[:, :, None] * patch[:, None, :]
    return total


def test_input_hessians_sum_each_convolutions_input_patches(small_checkpoint):
    model = load_checkpoint(small_checkpoint, "cpu").eval()
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    hessians = input_hessians(model, [image])
    convolutions = {name: conv for name, conv, _ in quantized_convolutions(model)}
    assert set(hessians) == set(convolutions)
    seen = {name: [] for name in convolutions}
    handles = [conv.register_forward_pre_hook(lambda module, inputs, name=name: seen[name].append(inputs[0]))
               for name, conv in convolutions.items()]
    with torch.no_grad():
        model.raw_outputs(image)
    for handle in handles:
        handle.remove()
    # The first convolution (3x3, stride 2), a depthwise one (3x3, stride 2) and the head's 3x3
    # convolution, which runs once a level: its sum is over every level's patches.
    depthwise = next(name for name, conv in convolutions.items() if conv.groups > 1 and conv.stride == (2, 2))
    head = next(name for name in convolutions if name.startswith("head."))
    assert len(seen[head]) == len(model.spec.levels) > 1
    for name in (next(iter(convolutions)), depthwise, head):
        expected = sum(_patch_products(inputs.double().numpy(), convolutions[name]) for inputs in seen[name])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(hessians[name].numpy(), expected, rtol=1e-4, atol=1e-5 * scale)
    assert hessians[depthwise].shape == (convolutions[depthwise].groups, 9, 9)


def test_gptq_moves_each_convolutions_outputs_on_real_photos_less_than_nearest_rounding():
    model = load_checkpoint(DEFAULT_CHECKPOINT, "cpu").eval()
    photos = sorted(SAMPLES.glob("*.jpg"))[:2]
    hessians = input_hessians(model, (torch.from_numpy(model_input(path, model.spec)["images"]) for path in photos))
    totals = {"gptq": 0.0, "nearest": 0.0}
    for name, conv, norm in quantized_convolutions(model):
        fold = batchnorm_fold_factor(norm)
        folded = conv.weight.detach().double() * (1 if fold is None else fold.double().reshape(-1, 1, 1, 1))
        weight = folded.reshape(conv.groups, conv.out_channels // conv.groups, -1)
        step = channel_steps(folded).reshape(conv.groups, -1, 1)
        errors = {}
        for rounding, integers in (("gptq", gptq_integers(weight, hessians[name], step)),
                                   ("nearest", torch.clamp(torch.round(weight / step), -64, 64))):
            # Sum over the photos' patches x of |(W - Q) x|²: how far the convolution's outputs move.
            difference = weight - integers * step
            errors[rounding] = float(((difference @ hessians[name]) * difference).sum())
            totals[rounding] += errors[rounding]
        assert errors["gptq"] <= errors["nearest"] * (1 + 1e-9), name
    # Measured: about a fifth over the whole network (994 against 4983 on these two photos).
    assert totals["gptq"] < totals["nearest"] / 3


def _random_model(backbone: str):
    """A small untrained model with BatchNorm statistics and scales drawn at random (some negative), so
    that folding moves the grid."""
    from rpn_cli.model.network import RegionProposalNetwork
    from rpn_cli.model.spec import default_mobilenet_spec

    torch.manual_seed(0)
    model = RegionProposalNetwork(default_mobilenet_spec(shorter_side=256, max_size=427, backbone=backbone)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.2, 3.0)
                module.running_mean.normal_()
                module.weight.normal_()
    return model


@pytest.mark.parametrize("backbone", ["mobilenet_v2_fpn", "efficientnet_lite0_fpn"])
def test_rounded_weights_lie_on_the_grid_the_export_derives_from_them(backbone):
    # EfficientNet-Lite pads as TensorFlow does, in a module before the convolution, and has 5x5 depthwise ones.
    model = _random_model(backbone)
    convolutions = quantized_convolutions(model)
    name, conv, norm = next((entry for entry in convolutions if entry[2] is not None))
    with torch.no_grad():
        norm.weight[0] = 0.0  # BatchNorm silences channel 0: its weights stay as they are
        conv.weight[1] = 0.0  # an all-zero channel stays zero
    before = conv.weight.detach().clone()
    original = {entry[0]: entry[1].weight.detach().clone() for entry in convolutions}
    images = [torch.from_numpy(model_input(path, model.spec)["images"]) for path in sorted(SAMPLES.glob("*.jpg"))[:2]]
    assert round_weights_gptq(model, images) == len(convolutions) > 40
    torch.testing.assert_close(conv.weight[0], before[0], rtol=0, atol=0)
    assert conv.weight[1].abs().sum() == 0
    moved = 0
    for entry_name, entry_conv, entry_norm in convolutions:
        fold = batchnorm_fold_factor(entry_norm)
        folded = entry_conv.weight.detach().double() * (1 if fold is None else fold.double().reshape(-1, 1, 1, 1))
        live = folded.flatten(1).abs().amax(dim=1) > 0
        steps = channel_steps(folded)
        integers = folded / steps
        # On the grid, each live channel reaching ±64 so the export's step (largest / 64) is the same one.
        assert (integers - integers.round()).abs().max() < 1e-4, entry_name
        assert (integers.flatten(1).abs().amax(dim=1)[live] - INT8_WEIGHT_MAX).abs().max() < 1e-4, entry_name
        # That step is the original weights' step: GPTQ keeps the grid, it changes the integers.
        original_folded = original[entry_name].double() * (1 if fold is None else fold.double().reshape(-1, 1, 1, 1))
        torch.testing.assert_close(steps, channel_steps(original_folded), rtol=1e-6, atol=0)
        moved += int((integers.round() != torch.round(original_folded / steps)).sum())
    assert moved > 0


def test_a_convolution_gptq_cannot_see_keeps_its_weights():
    model = _random_model("mobilenet_v2_fpn")
    convolutions = quantized_convolutions(model)
    name, first, _ = convolutions[0]
    first.padding_mode = "reflect"  # its input patches are not zero-padded: left to nearest rounding
    before = first.weight.detach().clone()
    images = [torch.from_numpy(model_input(path, model.spec)["images"]) for path in sorted(SAMPLES.glob("*.jpg"))[:1]]
    assert set(input_hessians(model, images)) == {entry[0] for entry in convolutions[1:]}
    assert round_weights_gptq(model, images) == len(convolutions) - 1
    torch.testing.assert_close(first.weight, before, rtol=0, atol=0)


@pytest.mark.heavy
def test_the_int8_export_stores_the_integers_gptq_chose(small_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import json

    import onnx

    from rpn_cli.inference.quantize import QUANTIZATION_KEY
    from rpn_cli.io.checkpoint import save_checkpoint

    photos = sorted(SAMPLES.glob("*.jpg"))
    int8 = tmp_path / "gptq.int8.onnx"
    result = run_rpn("export", small_checkpoint, int8, "--format", "onnx-int8", "--calibration", SAMPLES,
                     "--calibration-method", "minmax")
    assert result.returncode == 0, result.stderr
    recipe = {entry.key: entry.value for entry in onnx.load(str(int8)).metadata_props}[QUANTIZATION_KEY]
    assert json.loads(recipe)["weight_rounding"] == "gptq"
    # The oracle: the checkpoint rounded here, exported as float32. ONNX Runtime's int8 file holds its
    # weights to float precision, and the original checkpoint's export is up to half a step away.
    model = load_checkpoint(small_checkpoint, "cpu").eval()
    round_weights_gptq(model, [torch.from_numpy(model_input(path, model.spec)["images"]) for path in photos])
    save_checkpoint(model, tmp_path / "rounded.safetensors")
    for checkpoint, name in ((tmp_path / "rounded.safetensors", "rounded.onnx"), (small_checkpoint, "plain.onnx")):
        assert run_rpn("export", checkpoint, tmp_path / name).returncode == 0
    rounded, plain = int8_weight_distances(tmp_path / "rounded.onnx", int8), int8_weight_distances(tmp_path / "plain.onnx", int8)
    assert len(rounded) == len(plain) > 40
    assert max(rounded) < 1e-3
    assert max(plain) > 0.5 + 1e-3  # not what nearest rounding of the checkpoint would store
    # --weight-rounding nearest is ONNX Runtime's own rounding of the checkpoint's weights.
    nearest = tmp_path / "nearest.int8.onnx"
    result = run_rpn("export", small_checkpoint, nearest, "--format", "onnx-int8", "--calibration", SAMPLES,
                     "--calibration-method", "minmax", "--weight-rounding", "nearest")
    assert result.returncode == 0, result.stderr
    assert max(int8_weight_distances(tmp_path / "plain.onnx", nearest)) <= 0.5 + 1e-3
    recipe = {entry.key: entry.value for entry in onnx.load(str(nearest)).metadata_props}[QUANTIZATION_KEY]
    assert json.loads(recipe)["weight_rounding"] == "nearest"


def test_weight_rounding_is_checked_before_any_work(small_checkpoint, tmp_path):
    result = run_rpn("export", small_checkpoint, tmp_path / "int8.onnx", "--format", "onnx-int8",
                     "--calibration", SAMPLES, "--weight-rounding", "stochastic")
    assert result.returncode == 2
    assert result.stderr == "error: --weight-rounding stochastic: choose from gptq, nearest\n"
    assert not (tmp_path / "int8.onnx").exists()
    result = run_rpn("export", small_checkpoint, tmp_path / "model.onnx", "--weight-rounding", "nearest")
    assert result.returncode == 2
    assert result.stderr == "error: --weight-rounding: only for --format onnx-int8, not onnx\n"
    assert not (tmp_path / "model.onnx").exists()
