"""The ONNX graph as onnxprune reads it: loading and saving, the node index, op facts, shapes and
the one shape inference, MACs, normalization (BN folding) and the fold analysis every stage shares."""
