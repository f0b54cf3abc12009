"""What an int8 ONNX file stores against a float32 export of the same network."""

import numpy as np


def int8_weight_distances(fp32, int8) -> list[float]:
    """Each quantized convolution's largest |int8 weight - float32 weight| in ``int8`` against ``fp32``,
    in steps of its channel (BatchNorm folded by the export, so both files name the folded weights alike)."""
    import onnx
    from onnx import numpy_helper

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
        distances.append(float((np.abs(quantized[source].astype(np.float32) * scale - floats[name]) / scale).max()))
    return distances
