"""What ONNX shape inference says about a model: the one place that calls it, once per model version.

Why one place: the MACs count, the speed planner's layer table, the calibration runner's segment
types, the rewriter and the channel-group tracer each used to run ``onnx.shape_inference`` on the
model in front of them — up to 15 times in one ``prune()`` on ResNet-20 with calibration, the
same answer each time (the budget search calibrates several candidate plans, and every
calibration ran it twice). Inference copies the whole model through protobuf, so on a large
model each call costs about as much as reading it.

A *model version* is what shape inference reads: the graph (nodes, inputs, outputs, value_info
where it is kept), the opsets, the functions and the initializers — except the values of
floating-point initializers that only ops which never read input values for a shape consume
(``VALUE_FREE_OPS``: Conv and Gemm weights, biases, affine scales). Refitting, masking or
distilling weights therefore keeps the version; changing a node, an input dim or a Reshape
target makes a new one. Facts are cached by a digest of that content (``version_key``), so a
copy of a model (the calibration's masked working copy, the calibrated model) shares its
original's facts without any stage passing them along.

The two facts in use:
- ``static_shapes_at_batch_one(model, shapes)``: fully static shapes at batch 1 and the working
  input shapes (``shapes.with_input_shapes``), with data propagation — what MACs and the
  planners' cost model count at; plus the element types (``tensor_types``);
- ``tensor_shapes(model)``: shapes as the model declares its inputs, symbolic dims kept as their
  names (or None) — what the rewriter and the channel tracer decide on, so no decision rests on a
  size that holds only at the working shape.

Where onnx's inference leaves a Conv's input or output without a shape, ORT's symbolic shape
inference fills the gaps (``_filled``): onnx cannot follow a size computed in the graph (``Shape``
→ ``Gather`` → arithmetic → ``Cast`` → ``Pad``, as tf2onnx writes "SAME" padding for dynamic
sizes: yahoo-open-nsfw's ResNet-50), so every Conv after the first such Pad had no shape and the
planner skipped 52 of its 53 Convs. ORT's tool evaluates those shape computations. It runs only
for such a model, so every other model's facts are onnx's alone.

Results are copies: a caller may change what it gets.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import onnx

from .graph import FLOAT_TYPES
from .shapes import with_input_shapes

# ops no input *value* of which changes an output's shape or type (only input shapes and types do)
VALUE_FREE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div",
                            "BatchNormalization", "PRelu"})
CACHE_SIZE = 16  # model versions remembered (facts are small: names to dims)

_cache: OrderedDict = OrderedDict()


def clear_cache() -> None:
    """Forget every fact (tests count inferences from a cold start)."""
    _cache.clear()


def version_key(model: onnx.ModelProto, with_value_info: bool = True) -> str:
    """Digest of everything shape inference reads of ``model`` (see the module docstring)."""
    h = hashlib.blake2b(digest_size=20)

    def add(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    graph = model.graph
    add(str(model.ir_version).encode())
    for part in (model.opset_import, model.functions, graph.input, graph.output,
                 graph.value_info if with_value_info else (), graph.node, graph.sparse_initializer):
        add(b"|")
        for message in part:
            add(message.SerializeToString(deterministic=True))
    value_free = _value_free_initializers(graph)
    add(b"|")
    for tensor in sorted(graph.initializer, key=lambda t: t.name):  # order is not read; a rewrite may change it
        if tensor.name in value_free:
            add(f"{tensor.name}:{tensor.data_type}:{list(tensor.dims)}".encode())
        else:
            add(tensor.SerializeToString(deterministic=True))
    return h.hexdigest()


def _value_free_initializers(graph: onnx.GraphProto) -> set[str]:
    """Floating-point initializers every reader of which is in ``VALUE_FREE_OPS`` (default domain)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    return {t.name for t in graph.initializer
            if t.data_type in FLOAT_TYPES and t.name not in outputs and readers.get(t.name)
            and all(n.op_type in VALUE_FREE_OPS and n.domain in ("", "ai.onnx") for n in readers[t.name])}


def _cached(key: tuple, compute):
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = compute()
    _cache[key] = value
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def inferred_at_batch_one(model: onnx.ModelProto, shapes=None) -> onnx.ModelProto:
    """A copy at batch 1 and the input shapes ``shapes`` (``shapes.resolve_input_shapes``; None:
    resolved by its rules), with every static shape inferred (uncached: the facts below are)."""
    return onnx.shape_inference.infer_shapes(_fixed_at_batch_one(model, shapes), data_prop=True)


def static_shapes(inferred: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes by tensor name (initializers included) of an inferred model."""
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        ttype = vi.type.tensor_type
        if not ttype.HasField("shape"):  # rank unknown: not a scalar
            continue
        dims = ttype.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _fixed_at_batch_one(model: onnx.ModelProto, shapes=None) -> onnx.ModelProto:
    fixed = with_input_shapes(model, shapes, batch=1)
    del fixed.graph.value_info[:]
    return fixed


SHAPED_OPS = ("Conv", "ConvTranspose")  # whose input and output shapes the planners and channel rules need


def _unshaped(model: onnx.ModelProto, known: dict) -> bool:
    """Whether a Conv's data input or output is missing from ``known`` (name -> dims)."""
    return any(name and name not in known for node in model.graph.node if node.op_type in SHAPED_OPS
               for name in (node.input[0] if node.input else "", node.output[0] if node.output else ""))


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ORT's symbolic shape inference of a copy of ``model`` (what it found, also where it could
    not finish), or None where it fails (best effort: onnx's facts stand).

    Its public ``infer_shapes`` is the same loop, but on a model it cannot finish (one custom op
    anywhere) it saves the model with all its weights as ``sym_shape_infer_temp.onnx`` plus a
    uuid-named data file in the working directory, then raises: each such run left a copy of the
    user's model behind, and the gaps it had filled were lost. So the loop is run here."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        if not any(o.domain in ("", "ai.onnx") and o.version >= 7 for o in model.opset_import):
            return None
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
        inference._preprocess(copy)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_
    except Exception:  # its own assertions, unsupported ops, custom domains, another ORT's internals
        return None


def _filled(model: onnx.ModelProto, shapes: dict, types: dict, static: bool) -> None:
    """Add to ``shapes`` / ``types`` what ORT's symbolic inference knows and onnx's did not, when a
    Conv lacks a shape (the module docstring). ``static``: only fully static shapes (the batch-1
    facts); else symbolic dims as their names."""
    if not _unshaped(model, shapes):
        return
    inferred = _symbolic(model)
    if inferred is None:
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.elem_type:
            types.setdefault(vi.name, t.elem_type)
        if vi.name in shapes or not t.HasField("shape"):
            continue
        # ORT names a size it could not find unk__N, a name tf2onnx also uses for its own sizes: unknown
        dims = [d.dim_value if d.HasField("dim_value") else
                (None if not d.dim_param or d.dim_param.startswith("unk__") else d.dim_param) for d in t.shape.dim]
        if not static or all(isinstance(d, int) for d in dims):
            shapes[vi.name] = dims


def _at_batch_one(model: onnx.ModelProto, shapes=None) -> tuple[dict, dict]:
    fixed = _fixed_at_batch_one(model, shapes)

    def infer():
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
                 if vi.type.tensor_type.elem_type}
        found = static_shapes(inferred)
        _filled(fixed, found, types, static=True)
        return found, types

    return _cached(("batch_one", version_key(fixed, with_value_info=False)), infer)


def static_shapes_at_batch_one(model: onnx.ModelProto, shapes=None) -> dict[str, list[int]]:
    """Fully static shapes by tensor name (initializers included) of ``model`` at batch 1 and the
    input shapes ``shapes`` (``shapes.resolve_input_shapes``; None: resolved by its rules).
    Raises what ``onnx.shape_inference.infer_shapes`` raises on a model it cannot infer."""
    static, _ = _at_batch_one(model, shapes)
    return {name: list(dims) for name, dims in static.items()}


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor shape inference can type, and of those ``model`` declares
    (value_info, inputs, outputs); inference is best effort here: on a model it cannot infer,
    only the declared ones."""
    types = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    try:
        types.update(_at_batch_one(model)[1])
    except Exception:  # e.g. data propagation fails: the declared dims' inference, itself best effort
        types.update(_declared(model)[1])
    return types


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred shapes by tensor name at the dims ``model`` declares; symbolic dims kept as their
    names (or None). Best effort: where inference fails, the declared shapes only (unknown
    shapes only disable what depends on them)."""
    return {name: list(dims) for name, dims in _declared(model)[0].items()}


def _declared(model: onnx.ModelProto) -> tuple[dict, dict]:
    def infer():
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # best effort
            inferred = model
        found, types = {}, {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.elem_type:
                types[vi.name] = t.elem_type
            if t.HasField("shape"):
                found[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                  for d in t.shape.dim]
        for init in model.graph.initializer:
            found[init.name] = list(init.dims)
        _filled(model, found, types, static=False)
        return found, types

    return _cached(("declared", version_key(model)), infer)

