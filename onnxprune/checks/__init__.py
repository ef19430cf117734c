"""Everything that runs the model in ONNX Runtime: the one session constructor, verification against the
masked original, CI gates, accuracy/agreement evaluation and interleaved benchmarking."""
