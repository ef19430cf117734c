"""Check a rewritten model against its exactness oracle in ONNX Runtime.

The oracle is the normalized original with every pruned grouped kernel set to zero: grouped
kernel pruning removes exactly those multiply-adds, so the two must agree up to float rounding.
Rules:
- inputs are seeded random normals; a symbolic first dimension becomes ``batch``; other
  symbolic dimensions come from ``shapes.resolve_input_shapes`` (the pipeline verifies its
  working model, whose symbolic dims are already set: ``--input-shape``, calibration data or
  the default);
- a reference model ONNX Runtime cannot run at those shapes is the input's problem (exit 2,
  with a hint to ``--input-shape``); a rewritten model it cannot run is an internal error;
- agreement is ``max|a - b| / scale`` per output, worst output reported, tolerance 1e-4, where
  ``scale = max|a|``, floored at the output's range when it comes from a bounded activation
  (``output_floors``: Sigmoid, HardSigmoid, Softmax, Tanh -> 1; Clip with constant bounds ->
  its largest bound), seen through layout ops (Reshape, Transpose, Concat, ...) and Casts to a
  float type (the fp16 converter puts one before each graph output). Why: a saturated map (a
  Sigmoid near 1e-4 everywhere) has a tiny ``max|a|`` while float rounding in its logits is
  relative to *their* size, so logits agreeing to 1e-6 gave a "relative" output difference of
  2.4e-4 (and an fp16 model's map near 6e-7, judged at its own maximum behind the converter's
  Cast, failed a re-prune by 0.138). The cost: in such an output, a difference smaller than 1e-4
  of its range is not seen. A Softmax over very large logits (~1000, PP-OCRv4 rec pruned without
  data) can still fail on rounding alone (2.8e-4 seen on one seed): the floor is not raised
  with the logits' size, because a judged-logits scheme hid real errors (masked logits, heads of
  different sizes sharing one scale);
- the values are judged where the reference's are finite, and the candidate's must be finite
  there (a NaN difference compared as no difference); where the reference is NaN or infinite the
  candidate is not judged: the masked reference multiplies a zeroed kernel by an input, and
  0 * inf is NaN where the rewrite, which dropped that product, has a number. An output with no
  finite reference value cannot be judged and fails;
- outputs made by the post-processing of a selection op (TopK, ArgMax, ArgMin, NonMaxSuppression:
  an end-to-end detector's ranking of near-tied scores) are judged, when they alone fail, at the
  tensors that post-processing reads from the network, provided its nodes are the same in both
  models (``judged_before_selection``): a pick is a discontinuous function of its scores, so one
  float rounding step of the rewrite changed whole outputs (gtlv's YOLO11: 1.5e-7 before its
  TopK, 0.78 after), while the region's inputs agreeing, through identical nodes, is the same
  function as before. The result's ``note`` says so. Other outputs are judged as always;
- ORT runs on the CPU provider so the check means the same thing on every machine;
- an input model holding float16 (an fp16 output of ``--precision fp16``, pruned again) is
  compared through fp32 copies of the masked and the rewritten graph (``precision.as_fp32``: the same
  structure, every fp16 value widened exactly), after the rewritten model has run once as it is
  (its fp16 types must still hold together). Why: ORT's CPU provider computes an fp16 graph in
  fp32 and rounds to fp16 wherever an op has an fp16 kernel (Gather has, Conv has not), so the
  rewrite's Gathers round where the masked graph does not: measured on PP-OCRv5 det pruned twice,
  the fp16 graphs' logits differed by 5.2e-4 of their scale (one fp16 step), their fp32 copies by
  5.7e-7. The rewrite adds no arithmetic a float type could change (a Gather selects, a grouped
  Conv sums a subset of the same products), so the fp32 copies are the exactness check. Only
  when the reference holds fp16: a rewrite of an fp32 model that put values through fp16 would
  otherwise have its rounding widened away;
- the rewritten model must not require a graph input the input model did not (an input with
  an initializer is optional; one whose initializer was dropped would become required).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import InternalError, UserError
from ..ir.graph import GraphIndex, get_attr, is_float_cast, set_initializer
from ..planning.plan import LayerPlan, Plan
from ..rewriting.precision import MASKED_SUFFIX, as_fp32
from .runtime import create_session
from ..ir.shapes import batch_names, resolve_input_shapes

DEFAULT_TOLERANCE = 1e-4


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    passed: bool
    batch: int
    new_required_inputs: list[str] = field(default_factory=list)  # inputs only the rewritten model needs
    other_shapes: list[dict] = field(default_factory=list)  # verified again at further --input-shape sizes
    note: str = ""  # why ``batch`` is not the one asked for (a model that runs at batch 1 only)

    def as_dict(self) -> dict:
        return asdict(self)


def masked_model(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """``model`` (normalized) with the grouped kernels the plan prunes set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out.graph)
    layers = plan.by_node()
    for node in out.graph.node:
        layer = layers.get(node.name)
        if layer is None or node.op_type not in PLANNED_OPS:
            continue
        name, masked = node.input[1], masked_weight(node, index.constant(node.input[1]), layer)
        if index.use_count(name) > 1:
            name = f"{name}{MASKED_SUFFIX}{node.name}"
            node.input[1] = name
        set_initializer(out.graph, name, masked)
    return out


PLANNED_OPS = ("Conv", "Gemm")  # a Gemm is planned only as a reader of a coupled group (coupled.py)


def masked_weight(node: onnx.NodeProto, weight: np.ndarray, layer: LayerPlan) -> np.ndarray:
    """``weight`` with the kernels ``layer`` prunes zeroed; a Gemm's is read as a 1×1 Conv's
    [outputs, features] (transposed when ``transB`` is 0)."""
    mask = layer.kernel_mask()
    if node.op_type == "Gemm":
        mask = mask if get_attr(node, "transB", 0) else mask.T
    else:
        mask = mask[:, :, None, None]
    return np.where(mask, weight, 0).astype(weight.dtype)


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    return create_session(model, optimize=optimize)


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 2, given=None) -> dict[str, np.ndarray]:
    """Seeded random inputs at the working shapes (``given``: ``check_given``'s {name: dims}), the
    open batch axes at ``batch``, and so is every axis declared with the name of one (a size
    two inputs share, ``shapes.with_input_shapes`` leaves it open)."""
    rng = np.random.default_rng(seed)
    shapes = resolve_input_shapes(model, given)
    init_names = {t.name for t in model.graph.initializer}
    open_names = batch_names(model, shapes)
    feeds = {}
    for inp in (inp for inp in model.graph.input if inp.name not in init_names):
        ttype = inp.type.tensor_type
        declared = [d.dim_param for d in ttype.shape.dim]
        dims = [batch if d is None or (axis < len(declared) and declared[axis] in open_names) else d
                for axis, d in enumerate(shapes[inp.name].dims)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if dtype.kind == "f":
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(dims, dtype=dtype)
    return feeds


# Ops whose output lies in [-bound, bound] whatever their input: the scale an output of theirs is judged at.
BOUNDED_ACTIVATIONS = {"Sigmoid": 1.0, "HardSigmoid": 1.0, "Softmax": 1.0, "Tanh": 1.0}
# Ops that only move or select values: an output's range is its source's.
LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Slice", "Gather",
              "Split", "Expand", "Tile")


def output_floors(model: onnx.ModelProto) -> list[float]:
    """Per graph output, the range of the bounded activation it comes from (see the module
    rules), else 0.0 (judged at its own ``max|a|``)."""
    index = GraphIndex(model.graph)

    def bound(name: str, depth: int = 0) -> float:
        node = index.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx") or depth > 64:
            return 0.0
        if node.op_type in BOUNDED_ACTIVATIONS:
            return BOUNDED_ACTIVATIONS[node.op_type]
        if node.op_type == "Clip":
            limits = [index.constant(n) for n in node.input[1:3] if n]
            if len(limits) == 2 and all(v is not None and v.size == 1 for v in limits):
                return float(max(abs(float(v.reshape(-1)[0])) for v in limits))
            return 0.0
        if is_float_cast(node):
            return bound(node.input[0], depth + 1)
        if node.op_type in LAYOUT_OPS:
            data = [n for n in (node.input if node.op_type == "Concat" else node.input[:1]) if n]
            return min((bound(n, depth + 1) for n in data), default=0.0)
        return 0.0

    return [bound(out.name) for out in model.graph.output]


def compare_outputs(reference: list[np.ndarray], candidate: list[np.ndarray],
                    floors: list[float] | None = None) -> tuple[float, float]:
    """(max absolute, max relative difference) over all outputs; ``floors`` (per output, see
    ``output_floors``) raise the scale a difference is relative to."""
    floors = floors or [0.0] * len(reference)
    if len(reference) != len(candidate):
        return float("inf"), float("inf")
    max_abs = max_rel = 0.0
    for ref, got, floor in zip(reference, candidate, floors):
        ref64, got64 = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if ref64.shape != got64.shape:
            return float("inf"), float("inf")
        if ref64.size == 0:
            continue
        finite = np.isfinite(ref64)
        if not finite.any() or not np.isfinite(got64[finite]).all():
            return float("inf"), float("inf")  # nothing to judge, or NaN/inf where the reference has a number
        diff = float(np.max(np.abs(ref64[finite] - got64[finite])))
        scale = max(float(np.max(np.abs(ref64[finite]))), floor, 1e-12)
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return max_abs, max_rel


SHAPE_HINT = " (at the input shapes used; if the model needs other sizes, give them with --input-shape NAME=DIMS)"


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return sess.run(None, feeds)
    except Exception as exc:  # ORT raises several unrelated types for a failed run
        message = (f"ONNX Runtime cannot run {which} on inputs {_shapes_text(feeds)}: "
                   f"{str(exc).strip() or type(exc).__name__}")
        if which == "the input model":
            raise UserError(message + SHAPE_HINT) from None
        raise InternalError(message) from exc


def _shapes_text(feeds: dict[str, np.ndarray]) -> str:
    """``name=1x3x224x224, ...``: the inputs a failed run was given, for its one-line error."""
    return ", ".join(f"{name}={'x'.join(map(str, value.shape))}" for name, value in feeds.items())


def check_runs(model: onnx.ModelProto, seed: int = 0) -> None:
    """Run ``model`` once on random inputs (batch 1): a model that cannot run at the working
    input shapes is refused before planning, not after it."""
    try:
        sess = session(model)
    except UserError as exc:
        raise UserError(f"{exc}{SHAPE_HINT}") from None
    _run(sess, random_inputs(model, seed, batch=1), "the input model")


def check_runs_on_calibration(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """Run ``model`` once on the first calibration batch, as calibration will run it: a model
    that cannot (a size hard-coded in a Reshape or Resize that holds at one batch size only) is
    refused before minutes of planning, with ORT's reason, not as an internal error later.
    Returns the first output on that batch (what the fidelity numbers are measured on)."""
    from ..calibration.calib_stream import batch_size
    from .runtime import ort_reason

    batch, _, usable = batch_size(model, feeds, [])
    first = {name: value[:batch] for name, value in usable.items()}
    try:
        sess = session(model)
        return sess.run(None, first)[0]
    except UserError:
        raise
    except Exception as exc:  # ORT raises several unrelated types for a failed run
        raise UserError(f"ONNX Runtime cannot run the input model on the --calib inputs ({_shapes_text(first)}, "
                        f"the batches calibration runs): {ort_reason(exc)}; does the model hard-code a batch "
                        f"size?") from None


def required_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs a caller must feed: those without an initializer."""
    init_names = {t.name for t in model.graph.initializer}
    return [inp.name for inp in model.graph.input if inp.name not in init_names]


def verify(normalized: onnx.ModelProto, rewritten: onnx.ModelProto, plan: Plan,
           tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, batch: int = 2,
           original: onnx.ModelProto | None = None) -> VerifyResult:
    """Compare ``rewritten`` with the masked ``normalized`` model; with ``original`` (the model as
    loaded) also check that ``rewritten`` requires no input ``original`` did not."""
    had = set(required_inputs(original if original is not None else normalized))
    extra = [name for name in required_inputs(rewritten) if name not in had]
    if extra:
        return VerifyResult(float("inf"), float("inf"), tolerance, False, batch, extra)
    reference = masked_model(normalized, plan)
    wide = as_fp32(reference)
    if wide is None:
        return compare_models(reference, rewritten, tolerance, seed, batch)
    # an fp16 input: compared through fp32 copies of both graphs (module rules), and the rewritten
    # model run once as it is, at the batch the comparison could run at
    narrow = as_fp32(rewritten)
    result = compare_models(wide, rewritten if narrow is None else narrow, tolerance, seed, batch)
    _run(create_session(rewritten, load_error=None), random_inputs(reference, seed, result.batch),
         "the rewritten model")
    return result


def compare_models(reference: onnx.ModelProto, candidate: onnx.ModelProto, tolerance: float, seed: int = 0,
                   batch: int = 2, which: str = "the rewritten model", fp16: bool = False) -> VerifyResult:
    """Run ``reference`` and ``candidate`` on the same seeded random inputs (made for
    ``reference``) and judge them as the module rules say. Also how the ``--precision fp16``
    model is checked against its fp32 reference (``which`` names it; ``fp16``: a selection's
    post-processing is recognised through the converter's Casts, ``_same_region``)."""
    try:
        reference_session = session(reference)
    except UserError as exc:
        raise UserError(f"{exc}{SHAPE_HINT}") from None
    feeds, expected, ran_at = _reference_run(reference_session, reference, seed, batch)
    # a candidate ORT cannot load is our bug, not the user's input: no UserError wording
    got = _run(create_session(candidate, load_error=None), feeds, which)
    max_abs, max_rel = compare_outputs(expected, got, output_floors(reference))
    notes = [] if ran_at == batch else [f"the input model does not run at batch {batch}: verified at batch {ran_at}"]
    names = [[out.name for out in m.graph.output] for m in (reference, candidate)]
    if names[0] != names[1]:  # outputs are compared by position: they must be the same ones
        return VerifyResult(float("inf"), float("inf"), tolerance, False, ran_at,
                            note=f"{which} has outputs {names[1]}, the input model {names[0]}")
    passed = bool(max_rel <= tolerance)
    if not passed:
        before = judged_before_selection(reference, candidate, feeds, expected, got, tolerance, fp16)
        if before is not None:
            max_abs, max_rel, note = before
            passed = True
            notes.append(note)
    return VerifyResult(max_abs, max_rel, tolerance, passed, ran_at, note="; ".join(n for n in notes if n))


# Ops whose output is a choice among their inputs' values (an index, a ranking): a difference of
# one float rounding step in their input can change it whole.
SELECTION_OPS = {"TopK": 1, "ArgMax": 1, "ArgMin": 1, "NonMaxSuppression": 2}  # op -> data inputs read
REDUCE_OPS = ("ReduceMax", "ReduceMin")  # a class maximum before a TopK: its input is judged instead
BEFORE_SELECTION_OPS = frozenset({*REDUCE_OPS, *LAYOUT_OPS, *BOUNDED_ACTIVATIONS})  # traced back through
# What may follow a selection in the region: ops that move, pick, compare or count values and do no
# float arithmetic (arithmetic after a pick could magnify a difference the frontier's tolerance
# allows); any op whose inputs are all integers or booleans computes exactly and is allowed too.
AFTER_SELECTION_OPS = frozenset({*SELECTION_OPS, *REDUCE_OPS, *LAYOUT_OPS, "GatherElements", "GatherND", "Cast",
                                 "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "Where", "Equal",
                                 "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or"})
EXACT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
               onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class SelectionRegion:
    """The post-processing a selection op starts, in one model's main graph (``selection_region``)."""

    nodes: frozenset  # node indices: the selections, what follows them, the maxima/layout ops before them
    after: frozenset  # node indices of the selections and what follows them
    frontier: tuple  # the tensors region nodes read from the network


def selection_region(model: onnx.ModelProto) -> SelectionRegion | None:
    """The region of the main graph a selection op starts, or None.

    The region: every selection node, everything downstream of one (``after``), and the maxima,
    layout ops and bounded activations its data inputs come through (a Concat of box and score
    maps: each part judged at its own scale; a Sigmoid's logits, not its values: on random inputs
    gtlv's scores sit near 6e-4 and differ by 2.5e-4 of that where their logits agree to 5e-7,
    and judging them at the Sigmoid's range instead would hide a wrong ranking). The frontier: the
    inputs of region nodes made outside it (no initializers, no graph inputs). None when there is
    no selection op, a region node has a subgraph (its outer-scope reads are not in its inputs, so
    the frontier would be incomplete), or a node after a selection does float arithmetic
    (``AFTER_SELECTION_OPS``)."""
    from ..ir.shape_facts import tensor_types

    nodes = list(model.graph.node)
    selections = [i for i, node in enumerate(nodes) if node.domain in ("", "ai.onnx")
                  and node.op_type in SELECTION_OPS]
    if not selections:
        return None
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    after, made = set(selections), {out for i in selections for out in nodes[i].output if out}
    grew = True
    while grew:  # downstream closure, whatever the node order
        grew = False
        for i, node in enumerate(nodes):
            if i not in after and any(name in made for name in node.input):
                after.add(i)
                made.update(out for out in node.output if out)
                grew = True
    region = set(after)
    todo = [name for i in selections for name in nodes[i].input[:SELECTION_OPS[nodes[i].op_type]] if name]
    while todo:  # upstream through maxima and layout ops to where the values are made
        i = producer.get(todo.pop())
        if i is None or i in region:
            continue
        node = nodes[i]
        if node.domain in ("", "ai.onnx") and node.op_type in BEFORE_SELECTION_OPS:
            region.add(i)
            todo += [name for name in (node.input if node.op_type == "Concat" else node.input[:1]) if name]
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for i in region for attr in nodes[i].attribute):
        return None
    types = {**tensor_types(model), **{t.name: t.data_type for t in model.graph.initializer}}
    for i in after:
        node = nodes[i]
        exact = all(types.get(name) in EXACT_TYPES for name in node.input if name)
        if not exact and (node.domain not in ("", "ai.onnx") or node.op_type not in AFTER_SELECTION_OPS):
            return None
    inside = {out for i in region for out in nodes[i].output if out}
    outside = {t.name for t in model.graph.initializer} | {inp.name for inp in model.graph.input}
    frontier = tuple(dict.fromkeys(name for i in sorted(region) for name in nodes[i].input
                                   if name and name not in inside and name not in outside))
    return SelectionRegion(frozenset(region), frozenset(after), frontier)


def _same_region(reference: onnx.ModelProto, candidate: onnx.ModelProto, region: frozenset,
                 through_float_casts: bool = False) -> bool:
    """Whether every region node of ``reference`` is in ``candidate`` as it is (op, attributes,
    inputs, outputs, the values of the initializers it reads), under the same opsets.

    ``through_float_casts`` (the ``--precision fp16`` check only): the fp16 converter renames a
    node's output and re-makes the name with a Cast, and reads an input through one; a tensor is
    then the same where a chain of float Casts connects the names, and a float constant may differ
    by its fp16 rounding (that check's tolerance is fp16's, not exactness)."""
    opsets = [{o.domain or "ai.onnx": o.version for o in m.opset_import} for m in (reference, candidate)]
    if opsets[0] != opsets[1]:
        return False
    made = {out: node for node in candidate.graph.node for out in node.output if out}
    readers: dict[str, list] = {}
    for node in candidate.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    ref_init = {t.name: t for t in reference.graph.initializer}
    cand_init = {t.name: t for t in candidate.graph.initializer}

    def back(name: str) -> list[str]:  # ``name`` and what it is a float Cast of, and so on
        chain = [name]
        while through_float_casts and name in made and is_float_cast(made[name]) and len(chain) < 8:
            name = made[name].input[0]
            chain.append(name)
        return chain

    def forward(name: str) -> set[str]:  # ``name`` and the float Casts made of it
        if not through_float_casts:
            return {name}
        return {name} | {r.output[0] for r in readers.get(name, []) if is_float_cast(r)}

    for i in region:
        node = reference.graph.node[i]
        other = next((made[n] for n in back(node.output[0]) if n in made and made[n].op_type == node.op_type
                      and made[n].domain == node.domain), None)
        if other is None or len(other.input) != len(node.input) or len(other.output) != len(node.output):
            return False
        if any(want not in back(have) for want, have in zip(node.input, other.input)):
            return False
        if any(want not in forward(have) for want, have in zip(node.output, other.output)):
            return False
        attributes = [sorted(a.SerializeToString() for a in n.attribute) for n in (node, other)]
        retargeted = through_float_casts and is_float_cast(node) and is_float_cast(other)  # the converter's fp16
        if attributes[0] != attributes[1] and not retargeted:
            return False
        for name in node.input:
            if name not in ref_init:
                continue
            if name not in cand_init:
                return False
            a, b = (onnx.numpy_helper.to_array(t) for t in (ref_init[name], cand_init[name]))
            same = np.array_equal(a, b) or (through_float_casts and a.dtype.kind == b.dtype.kind == "f"
                                            and a.shape == b.shape
                                            and np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-3))
            if not same:
                return False
    return True


def _exposed(model: onnx.ModelProto, names) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend([onnx.ValueInfoProto(name=name) for name in names])
    return copy


def _frontier_difference(before: list[np.ndarray], after: list[np.ndarray]) -> tuple[float, float] | None:
    """(max abs, max relative difference) of the frontier values, or None where they cannot be
    judged: integer and boolean values must be equal (a count or an index off by one is not
    rounding), floats are judged at their own scale (no activation floor: a Sigmoid's floor would
    hide a wrong ranking of its small values) and must be finite in the reference (a NaN skipped
    there could hide a different pick)."""
    max_abs = max_rel = 0.0
    for ref, got in zip(before, after):
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            return None
        if ref.dtype.kind in "iub" or got.dtype.kind in "iub":
            if ref.dtype != got.dtype or not np.array_equal(ref, got):
                return None
            continue
        if not np.isfinite(ref).all():
            return None
        diff_abs, diff_rel = compare_outputs([ref], [got])
        max_abs, max_rel = max(max_abs, diff_abs), max(max_rel, diff_rel)
    return max_abs, max_rel


def judged_before_selection(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                            expected: list[np.ndarray], got: list[np.ndarray], tolerance: float,
                            through_float_casts: bool = False):
    """``(max_abs, max_rel, note)`` of a comparison that judges the outputs a selection op's
    post-processing makes at the tensors that post-processing reads, or None where that does not
    apply or does not pass.

    Why: an end-to-end detector (gtlv==0.1.4's YOLO11: TopK over 3024 near-tied scores on random
    inputs) picks other boxes when its scores move by one float rounding step, so the masked and
    the rewritten model agreed to 1.5e-7 before the TopK and differed by 0.78 after it, and every
    such model failed verification. Judging the region's inputs instead loses nothing: its nodes
    are the same in both models (checked: ops, attributes, initializer values, opsets), what
    follows a pick does no float arithmetic, integer inputs must be equal, and every value it reads
    from the network is judged, so its outputs are the same function of inputs that agree. Only
    outputs made after a selection are judged this way; the others as always."""
    region = selection_region(reference)
    if region is None:
        return None
    nodes = reference.graph.node
    made_after = {out for i in region.after for out in nodes[i].output}
    later = [k for k, out in enumerate(reference.graph.output) if out.name in made_after]
    if not later or not region.frontier or not _same_region(reference, candidate, region.nodes, through_float_casts):
        return None
    direct = [k for k in range(len(expected)) if k not in later]
    floors = output_floors(reference)
    max_abs, max_rel = compare_outputs([expected[k] for k in direct], [got[k] for k in direct],
                                       [floors[k] for k in direct])
    try:
        before = create_session(_exposed(reference, region.frontier), load_error=None).run(None, feeds)
        after = create_session(_exposed(candidate, region.frontier), load_error=None).run(None, feeds)
    except Exception:  # a region whose inputs ORT cannot expose is judged as the outputs were
        return None
    front = _frontier_difference(before, after)
    if front is None:
        return None
    max_abs, max_rel = max(max_abs, front[0]), max(max_rel, front[1])
    if max_rel > tolerance:
        return None
    ops = "/".join(sorted({nodes[i].op_type for i in region.after if nodes[i].op_type in SELECTION_OPS}))
    outputs = ", ".join(repr(reference.graph.output[k].name) for k in later)
    _, after_rel = compare_outputs([expected[k] for k in later], [got[k] for k in later],
                                   [floors[k] for k in later])
    return max_abs, max_rel, (f"output(s) {outputs} come after a {ops} whose picks turn float rounding into other "
                              f"results (they differ by {after_rel:.3g}): judged at the {len(region.frontier)} "
                              f"tensor(s) it reads instead, whose nodes are the same in both models")


def _reference_run(sess: ort.InferenceSession, reference: onnx.ModelProto, seed: int, batch: int):
    """(feeds, outputs, batch) of the reference on random inputs at ``batch``, else at batch 1.

    Why batch 1: a symbolic batch axis can be pinned by another input's fixed size (AECMOS: GRU
    state ``h0`` is ``4 x 1 x 96``, so ``input``'s ``batch_size`` can only be 1); no --input-shape
    can change that, and the model ran at batch 1 before planning (``check_runs``). It is then
    verified at batch 1, as a model with a fixed batch is. So is any other model that runs at batch
    1 only (a Reshape hard-coding it): batch 1 is the only batch it can be compared at, and the
    result's note says so. A model that fails at batch 1 too gets the batch ``batch`` error, the
    input's problem."""
    feeds = random_inputs(reference, seed, batch)
    try:
        return feeds, _run(sess, feeds, "the input model"), batch
    except UserError as exc:
        if batch == 1:
            raise
        failure = exc
    single = random_inputs(reference, seed, 1)
    try:
        return single, sess.run(None, single), 1
    except Exception:  # ORT raises several unrelated types for a failed run
        raise failure from None
