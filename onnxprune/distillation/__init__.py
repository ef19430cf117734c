"""Optional label-free distillation (``--distill``, PyTorch): the ONNX -> torch bridge for the ops we
emit, augmented calibration batches and the held-out fidelity metrics."""
