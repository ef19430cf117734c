"""Which axis of a model's output holds class scores, and that output as logits with the class
axis second.

Why: top-1 agreement and KL compare an argmax and a softmax over one axis, and every fidelity
number (calibration's summary and gate, the sensitivity planner, `onnxprune eval`, the fp16
agreement) reads them from here. Reading axis 1 of every output was wrong in two common cases:

- a sequence recogniser's ``[N, T, C]`` output (PP-OCR rec): axis 1 is time, so the "agreement"
  was an argmax over time steps, and the planner's KL a softmax across them;
- an output that already is probabilities (a graph that ends in ``Softmax``): the KL of a
  softmax of probabilities is a damped, meaningless number. Its log is the logits' equivalent
  (``log_softmax(log p) = log p``).

Rules, in order (one output):

1. the output comes from ``Softmax`` / ``LogSoftmax`` (through ``Identity``, ``Dropout`` and
   Casts to a float type, such as the fp16 converter's): its axis holds the classes (``Softmax``:
   the output is probabilities). Before opset 13 the op normalised over every axis from ``axis``
   on as one, so the classes are the one non-singleton axis among those (``N × 1 × C`` with the
   default axis 1: C), and there are none when several are wider than 1;
2. else, an output with exactly one non-singleton axis after the batch axis (``N × C``,
   ``N × C × 1 × 1``, ``N × 1 × C``): that axis;
3. else, a 4-D ``N × C × H × W`` output with ``C ≥ 2``: axis 1, class scores per pixel (a
   segmentation map's layout; a raw multi-channel detection head is read the same way, so its
   "agreement" is per-pixel argmax agreement, still a measure of change);
4. else none: a one-channel detector map, a 3-D output without a Softmax (``[N, C, L]`` and
   ``[N, T, C]`` look alike), a time-major sequence. Fidelity is then the relative squared error
   of the whole output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..ir.graph import is_float_cast

PASS_THROUGH = {"Identity", "Dropout"}  # and a Cast to a float type (graph.is_float_cast)
PROBABILITY_FLOOR = 1e-30  # log of a probability that underflowed to 0


@dataclass(frozen=True)
class OutputKind:
    """What the graph says about one output: the normalising op's axis (``None`` when no
    ``Softmax`` / ``LogSoftmax`` produces it), whether the output is probabilities, and whether
    the op normalised over every axis from ``axis`` on (opset < 13)."""

    softmax_axis: int | None = None
    probabilities: bool = False
    coerced: bool = False


def output_kinds(model: onnx.ModelProto) -> dict[str, OutputKind]:
    """Rule 1 for every graph output of ``model`` (the graph part of the decision), by name.
    Measure a changed or truncated copy of a model with its original's kinds: a probe graph
    that starts after the Softmax no longer shows it."""
    producer = {out: node for node in model.graph.node for out in node.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)

    def kind(name: str) -> OutputKind:
        node = producer.get(name)
        while node is not None and node.input and (node.op_type in PASS_THROUGH or is_float_cast(node)):
            node = producer.get(node.input[0])
        if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
            return OutputKind()
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        return OutputKind(axis, node.op_type == "Softmax", opset < 13)

    return {out.name: kind(out.name) for out in model.graph.output}


def output_kind(model: onnx.ModelProto, name: str) -> OutputKind:
    """Rule 1 for graph output ``name`` of ``model`` (an unknown name: no Softmax)."""
    return output_kinds(model).get(name, OutputKind())


def class_axis(kind: OutputKind, shape: tuple) -> int | None:
    """The class axis of an output of ``shape`` (rules 1–4), or None."""
    rank = len(shape)
    if rank < 2:
        return None
    if kind.softmax_axis is not None:
        axis = kind.softmax_axis + rank if kind.softmax_axis < 0 else kind.softmax_axis
        if not 1 <= axis < rank:
            return None
        if kind.coerced:  # normalised over the axes from `axis` on: one of them may hold the classes
            wide = [a for a in range(axis, rank) if shape[a] != 1]
            return wide[0] if len(wide) == 1 and shape[wide[0]] >= 2 else None
        return axis if shape[axis] >= 2 else None
    wide = [axis for axis in range(1, rank) if shape[axis] != 1]
    if len(wide) == 1 and shape[wide[0]] >= 2:
        return wide[0]
    return 1 if rank == 4 and shape[1] >= 2 else None


def as_logits(value: np.ndarray, kind: OutputKind) -> np.ndarray:
    """``value`` with its class axis moved to axis 1 (log of probabilities), float64; an output
    without class scores comes back as ``N × 1 × rest``, so comparisons see no class axis."""
    value = np.asarray(value, dtype=np.float64)
    axis = class_axis(kind, value.shape)
    if axis is None:
        return value.reshape(len(value), 1, -1) if value.ndim >= 1 and len(value) else value
    if kind.probabilities:
        value = np.log(np.maximum(value, PROBABILITY_FLOOR))
    return np.moveaxis(value, axis, 1)
