"""Output pin (design issue 9): the same inputs and options give the same output as when the pin
was written, for the ResNet-20 sample pruned by the CLI in four modes:

- ``default`` (``--groups auto``, the fidelity planner with its data-free proxy) and ``groups8``
  (``--groups 8``): pinned by the sha256 of the output file's bytes. No float in these outputs is
  computed — every weight value is copied (selected, reordered) from the input, which
  ``test_uncalibrated_outputs_only_copy_input_values`` checks — so the bytes are the same on
  every CPU and BLAS build;
- ``calib`` and ``groups8_calib`` (the same plus ``--calib samples/fmnist_calib.npz --calib-size
  256``): the refit weights are least-squares solutions whose last bits depend on the BLAS
  build, so these are pinned by a fingerprint robust to that: the sha256 of a canonical text of
  the graph (nodes with their inputs, outputs and attributes, graph inputs and outputs, every
  initializer's name, shape and dtype, and the exact values of the non-float initializers such as
  Gather indices), and per float initializer its sum, sum of |x|, sum of squares, max |x| and 8
  values at fixed positions, compared with relative tolerance 1e-4.

The pins live in ``tests/pins/resnet20_output_pin.json``. After a deliberate change of behaviour
regenerate them with

    PYTHONPATH=. python3 tests/test_output_pin.py --regenerate

(or ``ONNXPRUNE_REGENERATE_PINS=1 python3 -m pytest tests/test_output_pin.py``, which rewrites
the file and then checks against it) and commit the new file with the change that explains it.
A decision resting on a near-tie of floats (the clustering's eigenvectors, calibration's
data-aware channel choice) could in principle fall the other way on another machine; this test
would then fail there, which is the point: the output is not the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "resnet20.onnx"
CALIB = ROOT / "samples" / "fmnist_calib.npz"
PIN_FILE = Path(__file__).resolve().parent / "pins" / "resnet20_output_pin.json"
CALIB_OPTIONS = ["--calib", str(CALIB), "--calib-size", "256"]
MODES = {
    "default": [],
    "groups8": ["--groups", "8"],
    "calib": CALIB_OPTIONS,
    "groups8_calib": ["--groups", "8", *CALIB_OPTIONS],
}
EXACT = ("default", "groups8")  # pinned by the bytes
RTOL = 1e-4
SAMPLES_PER_TENSOR = 8


def prune_bytes(mode: str, folder: Path) -> bytes:
    from onnxprune.cli import main

    out = folder / f"{mode}.onnx"
    assert main([str(SAMPLE), str(out), "-q", *MODES[mode]]) == 0
    return out.read_bytes()


def _attribute_text(attr: onnx.AttributeProto) -> str:
    if attr.type == onnx.AttributeProto.TENSOR:
        value = f"tensor{list(attr.t.dims)}:{attr.t.data_type}:{_tensor_hash(attr.t)}"
    elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        value = "graph"  # none in these models; named so a new one shows up
    else:
        value = repr(onnx.helper.get_attribute_value(attr))
    return f"{attr.name}={value}"


def _tensor_hash(tensor: onnx.TensorProto) -> str:
    return hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()[:16]


def _value_info_text(vi: onnx.ValueInfoProto) -> str:
    ttype = vi.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in ttype.shape.dim] if ttype.HasField("shape") else None
    return f"{vi.name}:{ttype.elem_type}:{dims}"


def _is_float(tensor: onnx.TensorProto) -> bool:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind == "f"


def structure_text(model: onnx.ModelProto) -> str:
    """Everything but the float weight values, one fact a line."""
    lines = [f"ir {model.ir_version}", *(f"opset {o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)]
    lines += [f"meta {p.key}={p.value}" for p in model.metadata_props]
    graph = model.graph
    lines += [f"input {_value_info_text(vi)}" for vi in graph.input]
    lines += [f"output {_value_info_text(vi)}" for vi in graph.output]
    for node in graph.node:
        attrs = " ".join(_attribute_text(a) for a in sorted(node.attribute, key=lambda a: a.name))
        lines.append(f"node {node.name} {node.domain}:{node.op_type} {list(node.input)} -> {list(node.output)} {attrs}")
    for tensor in graph.initializer:
        value = "float" if _is_float(tensor) else _tensor_hash(tensor)
        lines.append(f"init {tensor.name} {list(tensor.dims)} {tensor.data_type} {value}")
    return "\n".join(lines) + "\n"


def tensor_stats(array: np.ndarray) -> dict:
    flat = array.astype(np.float64).ravel()
    positions = np.linspace(0, flat.size - 1, SAMPLES_PER_TENSOR).round().astype(int)
    return {"sum": float(flat.sum()), "sum_abs": float(np.abs(flat).sum()), "sum_sq": float((flat ** 2).sum()),
            "max_abs": float(np.abs(flat).max()), "samples": [float(v) for v in flat[positions]]}


def fingerprint(data: bytes) -> dict:
    model = onnx.load_from_string(data)
    return {"structure_sha256": hashlib.sha256(structure_text(model).encode()).hexdigest(),
            "initializers": {t.name: tensor_stats(numpy_helper.to_array(t))
                             for t in model.graph.initializer if _is_float(t)}}


def pin_of(mode: str, data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest()} if mode in EXACT else fingerprint(data)


def relative_options() -> dict:
    return {mode: [o.replace(str(ROOT) + os.sep, "") for o in options] for mode, options in MODES.items()}


def regenerate(folder: Path) -> dict:
    pins = {"sample": SAMPLE.name, "options": relative_options()}
    pins["modes"] = {mode: pin_of(mode, prune_bytes(mode, folder)) for mode in MODES}
    PIN_FILE.parent.mkdir(exist_ok=True)
    PIN_FILE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    return pins


def fingerprint_problems(expected: dict, got: dict) -> list[str]:
    """What differs between two fingerprints beyond float rounding (empty: they match)."""
    if expected["structure_sha256"] != got["structure_sha256"]:
        return ["the graph structure (nodes, attributes, shapes, names or index values) changed"]
    problems = []
    for name, want in expected["initializers"].items():
        have = got["initializers"][name]
        scale = want["max_abs"] or 1.0
        checks = [("sum", want["sum"], have["sum"], RTOL * want["sum_abs"]),
                  ("sum_abs", want["sum_abs"], have["sum_abs"], RTOL * want["sum_abs"]),
                  ("sum_sq", want["sum_sq"], have["sum_sq"], RTOL * want["sum_sq"]),
                  ("max_abs", want["max_abs"], have["max_abs"], RTOL * scale)]
        checks += [(f"sample {i}", w, h, RTOL * scale) for i, (w, h) in enumerate(zip(want["samples"],
                                                                                         have["samples"]))]
        problems += [f"{name}: {what} {h!r} != pinned {w!r}" for what, w, h, tol in checks if not abs(w - h) <= tol]
    return problems


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pin")
    if os.environ.get("ONNXPRUNE_REGENERATE_PINS"):
        regenerate(folder)
    return {mode: prune_bytes(mode, folder) for mode in MODES}


@pytest.fixture(scope="module")
def pins():
    return json.loads(PIN_FILE.read_text())


def test_pins_are_for_these_options(pins):
    assert pins["sample"] == SAMPLE.name
    assert pins["options"] == relative_options()


@pytest.mark.parametrize("mode", EXACT)
def test_uncalibrated_outputs_are_byte_identical_to_the_pin(outputs, pins, mode):
    assert pin_of(mode, outputs[mode]) == pins["modes"][mode], \
        f"--{mode} output bytes changed; if intended, regenerate the pins (see this module's docstring)"


@pytest.mark.parametrize("mode", sorted(set(MODES) - set(EXACT)))
def test_calibrated_outputs_match_the_pinned_fingerprint(outputs, pins, mode):
    expected, got = pins["modes"][mode], fingerprint(outputs[mode])
    assert sorted(got["initializers"]) == sorted(expected["initializers"])
    problems = fingerprint_problems(expected, got)
    assert not problems, f"{mode}: {problems[:5]}; if intended, regenerate the pins (see this module's docstring)"


@pytest.mark.parametrize("mode", EXACT)
def test_uncalibrated_outputs_only_copy_input_values(outputs, mode):
    """Why the bytes pin is safe across machines: no float the output holds was computed."""
    source = onnx.load(str(SAMPLE))
    values = {v for t in source.graph.initializer if _is_float(t)
              for v in numpy_helper.to_array(t).ravel().view(np.uint32).tolist()}
    pruned = onnx.load_from_string(outputs[mode])
    for tensor in pruned.graph.initializer:
        if _is_float(tensor):
            assert numpy_helper.to_array(tensor).dtype == np.float32
            bits = set(numpy_helper.to_array(tensor).ravel().view(np.uint32).tolist())
            assert bits <= values, f"{tensor.name} holds values not in the input"


def test_the_fingerprint_sees_small_changes(outputs, pins):
    """The fingerprint is not vacuous: a changed value, a renamed node or a changed attribute fail it."""
    data = outputs["groups8_calib"]  # G=8: Gather indices to change too
    expected = pins["modes"]["groups8_calib"]
    assert not fingerprint_problems(expected, fingerprint(data))
    model = onnx.load_from_string(data)
    conv = next(t for t in model.graph.initializer if _is_float(t) and t.dims and len(t.dims) == 4)
    value = numpy_helper.to_array(conv).copy()
    value.flat[0] += 1e-2 * max(np.abs(value).max(), 1e-6)
    conv.CopyFrom(numpy_helper.from_array(value, conv.name))
    assert fingerprint_problems(expected, fingerprint(model.SerializeToString()))
    model = onnx.load_from_string(data)
    model.graph.node[3].name += "_renamed"
    assert fingerprint_problems(expected, fingerprint(model.SerializeToString()))
    model = onnx.load_from_string(data)
    gather = next(t for t in model.graph.initializer if not _is_float(t))
    indices = numpy_helper.to_array(gather).copy()
    indices[[0, -1]] = indices[[-1, 0]]
    gather.CopyFrom(numpy_helper.from_array(indices, gather.name))
    assert fingerprint_problems(expected, fingerprint(model.SerializeToString()))


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {sys.argv[0]} --regenerate   (rewrites {PIN_FILE.relative_to(ROOT)})")
    with tempfile.TemporaryDirectory() as tmp:
        regenerate(Path(tmp))
    print(f"wrote {PIN_FILE}")
