#!/usr/bin/env python
"""Dropping whole residual blocks instead of narrowing channels (issue 13): how much does it cost?

Why: few-shot compression work (Wang & Wu, "Practical Network Acceleration with Tiny Sets", CVPR
2023) argues that with a few hundred training images, dropping whole blocks recovers better than
filter pruning, and it removes whole kernels, which matters on a launch-bound GPU. Their
recovery is training with feature mimicking; ours is least squares. This measures both ends
of what least squares can do for a dropped block on the real pretrained nets:

- ``identity``: the block's residual ``Add(skip, branch)`` becomes ``skip`` (the branch's nodes
  are removed);
- ``linear``: the block becomes one 1×1 Conv fitted by ridge least squares on the calibration
  crops to map the block's input to its output (the best linear stand-in for the branch, which
  a refit of the next Conv could at most fold in).

Blocks are taken greedily by the mean KL(dense || dropped) each adds per MAC it saves, measured
on calibration crops; each step's model is scored on the evaluation crops (disjoint photos). ::

    python benchmarks/block_drop.py samples/generated/mobilenet_v2.onnx [--mode identity|linear] [--blocks 5]
        [--save DROPPED.onnx]

``--save`` writes the last step's model, e.g. to prune it further with onnxprune.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import as_float, fidelity_metrics  # noqa: E402
from onnxprune.checks.runtime import create_session  # noqa: E402
from onnxprune.ir.macs import count_macs  # noqa: E402

GENERATED = ROOT / "samples" / "generated"


def residual_adds(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(Add node, skip input, output) for each identity-skip residual block: an Add of two computed
    tensors where one (the skip) is an ancestor of the other (the branch), the branch runs a Conv
    and the skip has the output's shape. Downsampling blocks (two Convs from a common input),
    Adds of constants, broadcast Adds (an SE-style gate) and decomposed activations are not
    blocks that can be dropped. Graphs with If/Loop subgraphs are not handled."""
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    shape = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}

    def runs_conv(branch: str, skip: str) -> bool:
        todo, seen = [branch], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Conv":
                return True
            todo.extend(name for name in node.input if name and name != skip)
        return False

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            node = producer.get(todo.pop())
            if node is not None:
                for inp in node.input:
                    if inp and inp not in seen:
                        seen.add(inp)
                        todo.append(inp)
        return seen

    found = []
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(n in constants for n in node.input):
            continue
        a, b = node.input
        skip, branch = (a, b) if a in ancestors(b) else (b, a) if b in ancestors(a) else (None, None)
        if skip and shape.get(skip) == shape.get(node.output[0]) and runs_conv(branch, skip):
            found.append((node.name, skip, node.output[0]))
    return found


def without_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    live, keep = {o.name for o in model.graph.output}, []
    for node in reversed(model.graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    used = {name for node in model.graph.node for name in node.input}
    produced = {name for node in model.graph.node for name in node.output}
    dropped = {init.name for init in model.graph.initializer if init.name not in used}
    for field, keep in ((model.graph.initializer, used), (model.graph.value_info, used | produced)):
        kept = [entry for entry in field if entry.name in keep]
        del field[:]
        field.extend(kept)
    inputs = [i for i in model.graph.input if i.name not in dropped]  # IR < 4 lists initializers as inputs
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model


def replace_block(model: onnx.ModelProto, add: str, skip: str, out: str, weight=None) -> onnx.ModelProto:
    """The block ending at ``add`` replaced by ``skip`` (identity) or by Conv1x1(skip) with ``weight``."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = list(result.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.op_type == "Add" and n.output[0] == out)  # names may repeat
    del result.graph.node[at]
    if weight is None:  # an Identity keeps ``out`` produced (it may be a graph output)
        result.graph.node.insert(at, helper.make_node("Identity", [skip], [out], name=add + "_dropped"))
    else:
        w, b = weight
        result.graph.initializer.extend([numpy_helper.from_array(w, out + "_linear_w"),
                                         numpy_helper.from_array(b, out + "_linear_b")])
        if result.ir_version < 4:  # IR < 4 lists every initializer as a graph input
            result.graph.input.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(v.shape))
                                      for name, v in ((out + "_linear_w", w), (out + "_linear_b", b)))
        result.graph.node.insert(at, helper.make_node("Conv", [skip, out + "_linear_w", out + "_linear_b"], [out],
                                                      name=add + "_linear"))
    return without_dead_nodes(result)


def run(model: onnx.ModelProto, x: np.ndarray, names=None, batch: int = 64) -> list[np.ndarray]:
    """``names`` (default: every graph output) of ``model`` on ``x``, in batches, 2 threads."""
    session = create_session(model, threads=2)
    feed = session.get_inputs()[0].name
    parts = [session.run(names, {feed: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate(p) for p in zip(*parts)]


def fit_linear(model: onnx.ModelProto, skip: str, out: str, x: np.ndarray, ridge: float = 1e-3):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in (skip, out):
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    a, y = run(probe, x, [skip, out])
    a = a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]).astype(np.float64)
    y = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]).astype(np.float64)
    a = np.hstack([a, np.ones((len(a), 1))])
    gram = a.T @ a
    solution = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), a.T @ y)
    c = y.shape[1]
    return solution[:-1].T.reshape(c, -1, 1, 1).astype(np.float32), solution[-1].astype(np.float32)


def mean_kl(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(fidelity_metrics(logits, reference)["mean_kl"])


def add_photo_args(parser: argparse.ArgumentParser, calib_size: int) -> None:
    """--calib, --calib-size and --eval: the photo crops of benchmarks/photos.py."""
    parser.add_argument("--calib", default=str(GENERATED / "photos_calib.npz"))
    parser.add_argument("--calib-size", type=int, default=calib_size)
    parser.add_argument("--eval", default=str(GENERATED / "photos_eval.npz"))


def load_photos(args) -> tuple[np.ndarray, np.ndarray]:
    """(calibration crops, evaluation crops) as float32 in [0, 1]."""
    with np.load(args.calib) as d:
        calib = as_float(d["input"][:args.calib_size])
    with np.load(args.eval) as d:
        evaluation = as_float(d["input"])
    return calib, evaluation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--mode", choices=("identity", "linear"), default="identity")
    parser.add_argument("--blocks", type=int, default=5, help="blocks to drop, one at a time (default 5)")
    add_photo_args(parser, calib_size=256)
    parser.add_argument("--save", default=None, help="write the model with the last step's blocks dropped here")
    args = parser.parse_args(argv)
    calib, evaluation = load_photos(args)
    model = onnx.load(args.model)
    dense_macs = count_macs(model)[0]
    reference = {"calib": run(model, calib)[0], "eval": run(model, evaluation)[0]}
    print("| blocks dropped | last block | MACs ratio | calibration KL | evaluation agreement | evaluation KL |")
    print("|---|---|---|---|---|---|")
    spent = 0.0  # calibration KL of the blocks already dropped
    for step in range(1, args.blocks + 1):
        best = None
        for add, skip, out in residual_adds(model):
            weight = fit_linear(model, skip, out, calib) if args.mode == "linear" else None
            candidate = replace_block(model, add, skip, out, weight)
            saved = 1 - count_macs(candidate)[0] / count_macs(model)[0]
            if saved <= 0:
                continue
            kl = mean_kl(run(candidate, calib)[0], reference["calib"])
            added = max(kl - spent, 0.0)  # the KL this block adds (a drop that helps adds none), per MAC saved
            if best is None or (added / saved, -saved) < best[0]:
                best = ((added / saved, -saved), add, candidate, kl)
        if best is None:
            break
        _, add, model, kl = best
        spent = kl
        m = fidelity_metrics(run(model, evaluation)[0], reference["eval"])
        print(f"| {step} | {add} | {count_macs(model)[0] / dense_macs:.3f} | {kl:.3f} | {m['agreement']:.1%} | "
              f"{m['mean_kl']:.3f} |", flush=True)
    if args.save:
        onnx.save(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
