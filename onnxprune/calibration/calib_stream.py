"""Running calibration data through a graph: the data split, the segment-by-segment runner and
the fidelity of a model's first output.

Why apart from ``calibrate``: the refit, the sensitivity measurement and the fidelity budget all
feed the same calibration inputs through ONNX Runtime in whole batches (a model with a fixed
batch size gets exactly that size), hold out the same slice, and compare outputs the same way.

- ``batch_size`` / ``split_holdout`` / ``count``: batches and the held-out slice (whole inputs);
- ``Stream``: runs only the nodes between two positions of the graph, from cached tensors, so
  every node runs once per model however many layers are refit;
- ``fidelity`` / ``compare_first_output``: top-1 agreement and KL(original || pruned) of the first
  output on held-out inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..errors import UserError
from ..checks.class_scores import as_logits, output_kind
from ..checks.evaluate import compare_logits
from ..ir.model_io import MAX_IR_VERSION
from ..ir.shape_facts import tensor_types
from ..ir.shapes import model_inputs
from ..checks.verify import session

BATCH = 64  # samples per ONNX Runtime call
HOLDOUT_DIVISOR = 8  # the last 1/8 of the samples is held out for fidelity
HELD_OUT = "held-out samples"  # fidelity["on"] when inputs were held out (the budget trusts only those)
MIN_SAMPLES_FOR_HOLDOUT = 16


def count(feeds: dict) -> int:
    return len(next(iter(feeds.values()))) if feeds else 0


def batch_size(model: onnx.ModelProto, feeds: dict, notes: list) -> tuple[int, int, dict]:
    """(batch, unit, feeds): ``BATCH``, 1 and ``feeds`` as given, or the model's fixed batch
    size twice and the samples cut to a multiple of it (a new dict: the caller's arrays are
    shared by every calibration of a run and stay whole)."""
    fixed = {dims[0] for _, dims in model_inputs(model) if dims and dims[0]}
    if not fixed:
        return BATCH, 1, feeds
    size = fixed.pop()
    if count(feeds) < size:
        raise UserError(f"the model has a fixed batch size of {size}, but only {count(feeds)} calibration "
                        f"samples were given")
    usable = count(feeds) // size * size
    if usable < count(feeds):
        notes.append(f"fixed batch size {size}: used {usable} of {count(feeds)} samples")
        feeds = {name: value[:usable] for name, value in feeds.items()}
    return size, size, feeds


def split_holdout(feeds: dict, unit: int = 1, divisor: int | None = None) -> tuple[dict, dict]:
    """(fit, held_out): the last 1/``divisor`` (default ``HOLDOUT_DIVISOR``) of the samples (whole
    batches of ``unit``) is held out."""
    divisor = divisor or HOLDOUT_DIVISOR
    n = count(feeds)
    held = (n // divisor) // unit * unit if n >= MIN_SAMPLES_FOR_HOLDOUT else 0
    fit_n = n - held
    return ({k: v[:fit_n] for k, v in feeds.items()}, {k: v[fit_n:] for k, v in feeds.items()})


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads: its inputs plus what its subgraphs (If/Loop bodies) read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for sub_node in sub.node:
                names.extend(node_reads(sub_node))
    return names


class Stream:
    """Runs a model forward over all samples in node-range segments, caching live tensors.

    ``advance(stop)`` runs nodes ``[position, stop)`` of the model *as it is now* (so weights
    written in between take effect) and keeps only the tensors a later node still reads.
    """

    def __init__(self, model: onnx.ModelProto, feeds: dict, batch: int):
        self.model, self.batch, self.position = model, batch, 0
        self.cache = dict(feeds)
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(model.graph.node):
            for name in node_reads(node):
                self.last_use[name] = i
        self.types = tensor_types(model)  # once per model version, shared by copies (shape_facts)
        self.unreadable: dict[str, str] = {}  # tensor -> why it has no row per input (not cached)

    def advance(self, stop: int, keep=()) -> dict[str, np.ndarray]:
        nodes = list(self.model.graph.node[self.position:stop])
        produced = {name for node in nodes for name in node.output if name}
        wanted = [name for node in nodes for name in node.output
                  if name and (self.last_use.get(name, -1) >= stop or name in keep)]
        if wanted:
            self.cache.update(self._run(nodes, produced, wanted))
        self.position = stop
        self.cache = {k: v for k, v in self.cache.items() if self.last_use.get(k, -1) >= stop or k in keep}
        return self.cache

    def _run(self, nodes, produced: set, wanted: list[str]) -> dict[str, np.ndarray]:
        initializers = {t.name: t for t in self.model.graph.initializer}
        self.check_readable(n for node in nodes for n in node_reads(node) if n not in produced)
        inputs = list(dict.fromkeys(n for node in nodes for n in node_reads(node)
                                    if n not in produced and n not in initializers and n in self.cache))
        used_inits = [initializers[n] for n in dict.fromkeys(r for node in nodes for r in node_reads(node))
                      if n in initializers]
        graph = helper.make_graph(
            nodes, "calibration_segment",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.cache[n].dtype), None)
             for n in inputs],
            [helper.make_tensor_value_info(n, self.types.get(n, onnx.TensorProto.FLOAT), None) for n in wanted],
            used_inits)
        segment = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                    ir_version=min(self.model.ir_version, MAX_IR_VERSION))
        segment.functions.extend(self.model.functions)
        sess = session(segment)
        count = len(next(iter(self.cache.values())))
        out: dict[str, np.ndarray] = {}
        for start in range(0, count, self.batch):
            results = sess.run(wanted, {n: self.cache[n][start:start + self.batch] for n in inputs})
            rows = min(self.batch, count - start)
            for name, value in zip(wanted, results):
                if name in self.unreadable or value.ndim == 0 or value.shape[0] != rows:
                    # no row per input: not cached; refused only if a later segment reads it
                    self.unreadable.setdefault(name, f"shape {list(value.shape)} for a batch of {rows} inputs")
                    continue
                if name not in out:
                    out[name] = np.empty((count,) + value.shape[1:], dtype=value.dtype)
                out[name][start:start + len(value)] = value
        return {name: value for name, value in out.items() if name not in self.unreadable}

    def check_readable(self, names) -> None:
        """Refuse to feed a tensor that has no row per input (a weight computed in the graph, a
        shape vector, a time-major sequence): calibration caches tensors row by row."""
        for name in names:
            if name in self.unreadable:
                raise UserError(f"--calib: tensor {name!r} ({self.unreadable[name]}) is read by a later layer, "
                                f"but calibration can carry only tensors with one row per input (not a weight "
                                f"computed in the graph or a time-major sequence): prune without --calib")


def fidelity(original: onnx.ModelProto, uncalibrated: onnx.ModelProto, calibrated: onnx.ModelProto,
             feeds: dict, batch: int) -> dict:
    """Top-1 agreement and mean KL(original || pruned) of the first output, before/after refit."""
    reference = first_output(original, feeds, batch)
    result = {"samples": count(feeds)}
    for label, model in (("uncalibrated", uncalibrated), ("calibrated", calibrated)):
        result[label] = compare_first_output(reference, first_output(model, feeds, batch))
    return result


def first_output(model: onnx.ModelProto, feeds: dict, batch: int) -> np.ndarray:
    """The first output on ``feeds``, as ``class_scores.as_logits`` makes it comparable."""
    sess = session(model)
    name = sess.get_outputs()[0].name
    parts = [sess.run([name], {k: v[s:s + batch] for k, v in feeds.items()})[0]
             for s in range(0, count(feeds), batch)]
    return as_logits(np.concatenate(parts), output_kind(model, name))


def compare_first_output(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Agreement of argmax over axis 1 and KL of softmax over axis 1 (``evaluate.compare_logits``,
    the one definition of both) when the output has class scores there, and the relative squared
    error in any case. Both arrays as ``class_scores.as_logits`` makes them (``first_output``
    does): the class axis moved to axis 1, or ``N × 1 × rest`` when there is none."""
    rel = float(np.sum((candidate - reference) ** 2) / max(np.sum(reference ** 2), 1e-30))
    if reference.ndim < 2 or reference.shape[1] < 2:
        return {"top1_agreement": None, "mean_kl": None, "rel_mse": rel}
    stats = compare_logits(candidate, reference)
    return {"top1_agreement": stats["agreement"], "mean_kl": stats["mean_kl"], "rel_mse": rel}
