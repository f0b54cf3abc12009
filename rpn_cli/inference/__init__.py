"""Running a model: loading it for a device and precision (BatchNorm folded), the backends (PyTorch,
ONNX Runtime), the local and Ray engines, export, and :class:`~rpn_cli.inference.proposer.Proposer`."""
