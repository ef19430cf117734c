"""Run an ONNX CNN graph as a ``torch.nn.Module`` whose trainable tensors are its initializers.

Used by ``distill.py`` to fine-tune a pruned model's weights while its graph stays fixed.

Why our own interpreter rather than onnx2torch: onnx2torch converts the pruned graphs correctly,
but it imports torchvision (a second heavy dependency pinned to the exact torch build), it names
parameters after *nodes* (``layers/0/conv1/Conv.weight``), not after the initializers we must
write back, a ``Gemm`` becomes an ``nn.Linear`` whose weight layout depends on ``transB``, and an
initializer shared by two nodes becomes two independent parameters. Writing weights back would
need to undo each converter's choices. Here every initializer is one tensor keyed by its ONNX
name, ops are evaluated in graph order with ``torch.nn.functional``, and writing back is a
name-for-name replacement (``export``). This module is the interpreter (parameters, node order,
the Gather + grouped Conv fusion, write-back); how each op computes is ``torch_ops.py``.

Rules:
- float initializers read as a ``Conv`` weight/bias or a ``Gemm`` B/C are ``nn.Parameter`` (the
  ``trainable`` argument can narrow or widen that set); all other initializers and ``Constant``
  nodes are frozen tensors (normalization constants, Gather indices, shapes, BN statistics);
- parameters are held in float32 whatever their stored float dtype; ``export`` casts back;
- ops outside ``SUPPORTED_OPS`` raise ``UnsupportedModel`` listing them when the module is
  built, so a caller can skip distillation with that message;
- ``BatchNormalization`` and ``Dropout`` run in inference mode (the graph is an inference graph).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .torch_ops import SUPPORTED_OPS, UnsupportedModel, _constant_value, _make_scattered_conv, _to_torch

try:
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

__all__ = ["OnnxModule", "SUPPORTED_OPS", "TRAINABLE_SLOTS", "UnsupportedModel", "default_trainable",
           "require_torch"]


def require_torch():
    if torch is None:
        raise ImportError("distillation needs PyTorch: pip install onnxprune[distill] "
                          "(or pip install torch)")
    return torch


TRAINABLE_SLOTS = {"Conv": (1, 2), "Gemm": (1, 2)}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def default_trainable(model: onnx.ModelProto) -> list[str]:
    """Float initializers read as a Conv weight/bias or a Gemm B/C, in initializer order."""
    graph_inputs = {i.name for i in model.graph.input}
    slots = set()
    for node in model.graph.node:
        for position in TRAINABLE_SLOTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position]:
                slots.add(node.input[position])
    return [t.name for t in model.graph.initializer
            if t.name in slots and t.name not in graph_inputs and t.data_type in _FLOAT_TYPES]


class OnnxModule(torch.nn.Module if torch is not None else object):
    """``model`` as a torch module: ``forward(*inputs)`` -> tuple of graph outputs.

    ``parameter(name)`` gives the ``nn.Parameter`` for the initializer ``name``; ``export()``
    returns a copy of the ModelProto with the trained values written back under the same names.
    """

    def __init__(self, model: onnx.ModelProto, trainable: list[str] | None = None):
        require_torch()
        super().__init__()
        self.model = model
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        if graph.sparse_initializer:
            raise UnsupportedModel("sparse initializers are not supported")
        unsupported = sorted({f"{n.domain + '.' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
                              for n in graph.node
                              if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS})
        if unsupported:
            raise UnsupportedModel(f"the torch bridge does not evaluate op(s) {', '.join(unsupported)}")
        init_names = {t.name for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        trainable = default_trainable(model) if trainable is None else list(trainable)
        wanted = set(trainable)
        self._param_keys: dict[str, int] = {}
        self._param_dtypes: dict[str, int] = {}
        self._consts: dict[str, torch.Tensor] = {}
        self.params = torch.nn.ParameterList()
        for tensor in graph.initializer:
            value = numpy_helper.to_array(tensor)
            if tensor.name in wanted:
                if tensor.data_type not in _FLOAT_TYPES:
                    raise UnsupportedModel(f"initializer {tensor.name!r} is not a float tensor and cannot be trained")
                self._param_keys[tensor.name] = len(self.params)
                self._param_dtypes[tensor.name] = tensor.data_type
                self.params.append(torch.nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32))))
            else:
                self._consts[tensor.name] = _to_torch(value)
        missing = wanted - set(self._param_keys)
        if missing:
            raise UnsupportedModel(f"trainable tensor(s) {sorted(missing)} are not initializers")
        self.nodes = []  # (node, attributes, op, input names)
        available = set(self.input_names) | init_names
        for node in graph.node:
            for name in node.input:
                if name and name not in available:
                    raise UnsupportedModel(f"node {node.name or node.op_type!r} reads {name!r} before it is "
                                           f"produced (graph not in topological order or uses subgraphs)")
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._consts[node.output[0]] = _constant_value(node, attrs)
            else:
                self.nodes.append((node, attrs, SUPPORTED_OPS[node.op_type], list(node.input)))
            available.update(o for o in node.output if o)
        self._fuse_gather_grouped_convs()

    def _fuse_gather_grouped_convs(self):
        """Evaluate ``Gather(axis=1, constant indices) -> Conv(group=G>1)`` as one dense Conv.

        PyTorch's CPU grouped convolution with few, unaligned channels per group is 5-30x slower
        than a dense one (forward and backward), which would make training the G=8 rewrites
        impractical. The pair computes exactly a dense Conv over the Gather's *source* whose
        weight is the grouped weight scattered to the source channels it reads (zeros elsewhere):
        the masked dense layer. Same products, plus exact zeros; the trainable tensor stays the
        grouped weight (the scatter is differentiable). Grouped Convs without such a Gather are
        run as a block-diagonal dense Conv when G <= 16, natively otherwise (depthwise always).
        """
        producers = {o: entry for entry in self.nodes for o in entry[0].output if o}
        readers: dict[str, int] = {}
        for _, _, _, inputs in self.nodes:
            for name in inputs:
                readers[name] = readers.get(name, 0) + 1
        for name in self.output_names:
            readers[name] = readers.get(name, 0) + 1
        fused_gathers = {}
        for i, (node, attrs, op, inputs) in enumerate(self.nodes):
            group = int(attrs.get("group", 1))
            if node.op_type != "Conv" or group == 1:
                continue
            if inputs[1] not in self._param_keys and inputs[1] not in self._consts:
                continue  # a weight computed in the graph: left to torch's grouped convolution
            weight = self.parameter(inputs[1]) if inputs[1] in self._param_keys else self._consts[inputs[1]]
            if weight.dim() < 3 or weight.shape[1] == 1:  # depthwise-like: torch's own kernel is fine
                continue
            gather = producers.get(inputs[0])
            indices = None
            if gather is not None and gather[0].op_type == "Gather" and gather[3][1] in self._consts:
                indices = self._consts[gather[3][1]]
                axis = int(gather[1].get("axis", 0))
                if axis != 1 or indices.dim() != 1 or indices.numel() != weight.shape[1] * group:
                    indices = None
            if indices is not None:
                self.nodes[i] = (node, attrs, _make_scattered_conv(indices, group), [gather[3][0]] + inputs[1:])
                fused_gathers[gather[0].output[0]] = fused_gathers.get(gather[0].output[0], 0) + 1
            elif group <= 16:
                self.nodes[i] = (node, attrs, _make_scattered_conv(None, group), inputs)
        # a Gather whose every reader was fused is not evaluated at all
        self.nodes = [entry for entry in self.nodes
                      if not (entry[0].op_type == "Gather" and entry[0].output[0] in fused_gathers
                              and fused_gathers[entry[0].output[0]] == readers.get(entry[0].output[0], 0))]

    # -- parameters ---------------------------------------------------------------------

    @property
    def trainable_names(self) -> list[str]:
        return list(self._param_keys)

    def parameter(self, name: str) -> torch.nn.Parameter:
        return self.params[self._param_keys[name]]

    def export(self) -> onnx.ModelProto:
        """Copy of the source model with every trainable initializer replaced by its value now."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        for tensor in out.graph.initializer:
            if tensor.name not in self._param_keys:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(self._param_dtypes[tensor.name])
            value = self.parameter(tensor.name).detach().cpu().numpy().astype(dtype)
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
        return out

    # -- evaluation ---------------------------------------------------------------------

    def forward(self, *inputs, extra: tuple = ()):
        """The graph outputs, then the tensors named in ``extra`` (intermediate values)."""
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            feeds = inputs[0]
        else:
            if len(inputs) != len(self.input_names):
                raise ValueError(f"expected {len(self.input_names)} inputs, got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs))
        env = dict(self._consts)
        for name, index in self._param_keys.items():
            env[name] = self.params[index]
        for name in self.input_names:
            value = feeds[name]
            env[name] = value if isinstance(value, torch.Tensor) else _to_torch(np.asarray(value))
        for node, attrs, op, input_names in self.nodes:
            args = [env[name] if name else None for name in input_names]
            try:
                results = op(self, args, attrs, node)
            except UnsupportedModel:
                raise
            except Exception as exc:
                raise UnsupportedModel(f"node {node.name or node.op_type!r} ({node.op_type}) failed in the "
                                       f"torch bridge: {type(exc).__name__}: {exc}") from exc
            if not isinstance(results, tuple):
                results = (results,)
            for name, value in zip(node.output, results):
                if name:
                    env[name] = value
        return tuple(env[name] for name in [*self.output_names, *extra])
