"""Fixtures shared by the CLI test modules."""

import onnx
import pytest

from graphs import resnet_basic


@pytest.fixture
def model_path(tmp_path):
    """A small residual model saved as ``in.onnx`` in the test's folder."""
    path = tmp_path / "in.onnx"
    onnx.save(resnet_basic().model(), path)
    return path
