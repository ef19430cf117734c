"""onnxprune: grouped kernel pruning (TMI-GKP) of CNNs in ONNX."""

__version__ = "0.1.0"
