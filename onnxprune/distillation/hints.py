"""Which intermediate tensors the distilled student is trained to reproduce ("hints").

Why: with a few hundred unlabelled images, matching only the teacher's logits gives the
student ~1000 numbers per image to learn from, and it memorises the training crops (MobileNetV2
at x0.70: 91% agreement on them, 63% on other photographs). The feature maps a pruned network
shares with its dense teacher carry far more signal per image: the residual stream after every
block and the feature map the classifier pools, each C x H x W values. Mimicking the teacher's
pooled-from features is what makes few-sample compression work in "Compressing Models with Few
Samples: Mimicking then Replacing" (Wang et al., CVPR 2022); block outputs are the targets of
block-wise reconstruction (BRECQ, Li et al., ICLR 2021).

Rules (``candidates``):
- ``"pool"``: the input of each global pooling (GlobalAveragePool / GlobalMaxPool, or a
  ReduceMean/ReduceMax over every axis after the channel axis), the features the head reads;
- ``"stream"``: those, plus the output of every ``Add`` (residual streams, in graph order);
- ``"none"``: no hint, the logits alone;
- a graph output is never a hint (the logit loss already covers the first one);
- a candidate is kept only when the teacher computes a tensor of the same name; the caller
  drops those whose shapes differ at run time (a stream the plan narrowed cannot be compared
  channel by channel).
The hint loss (``hint_loss``) is the mean over hints of the squared error relative to the
teacher tensor's mean square, so a large-valued late stage does not drown an early one.
"""

from __future__ import annotations

import onnx
from onnx import helper

HINT_KINDS = ("none", "pool", "stream")
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool"}


def candidates(student: onnx.ModelProto, teacher: onnx.ModelProto, kind: str) -> list[str]:
    """Hint tensor names of ``kind``, in the student's graph order, that the teacher also computes."""
    if kind not in HINT_KINDS:
        raise ValueError(f"hints must be one of {', '.join(HINT_KINDS)}, got {kind!r}")
    if kind == "none":
        return []
    produced = {name for node in teacher.graph.node for name in node.output if name}
    produced -= {o.name for o in student.graph.output} | {o.name for o in teacher.graph.output}
    names = []
    for node in student.graph.node:
        if node.op_type in _GLOBAL_POOLS or _spatial_reduction(node):
            names.append(node.input[0])
        elif kind == "stream" and node.op_type == "Add":
            names.append(node.output[0])
    return [name for name in dict.fromkeys(names) if name in produced]


def _spatial_reduction(node: onnx.NodeProto) -> bool:
    """A ReduceMean/ReduceMax with constant ``axes`` attribute covering axes 2.. (rank-4 NCHW)."""
    if node.op_type not in ("ReduceMean", "ReduceMax"):
        return False
    axes = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"), None)
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (their types left to the runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def hint_loss(student_values, teacher_values):
    """Mean over hints of mean((s - t)^2) / mean(t^2) (torch tensors)."""
    import torch

    terms = [torch.mean((s - t) ** 2) / torch.clamp(torch.mean(t ** 2), min=1e-12)
             for s, t in zip(student_values, teacher_values)]
    return torch.stack(terms).mean()
