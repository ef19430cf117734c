#!/usr/bin/env python
"""Would a data-aware low-rank factorisation of 1×1 Convs cost less fidelity than channel cuts? (issue 13)

Why: on the real pretrained nets every channel cut of the fidelity planner costs ~0.17 nats of KL
at ×0.85 MACs, and neither refits nor distillation on 512 images repair it. A 1×1 Conv
``y = W x + b`` can instead be replaced by two 1×1 Convs through an ``r``-dimensional bottleneck
that keeps every channel: the best such map on data (Zhang et al., "Accelerating Very Deep
Convolutional Networks", 2015) projects the outputs onto the top-``r`` principal directions
``U`` of their covariance, ``y' = U Uᵀ W x + b + (I − U Uᵀ) W μ``. It costs ``r·(Cin + Cout)``
MACs per pixel instead of ``Cin·Cout``.

This probe measures it without writing the factorised graph: the product ``U Uᵀ W`` replaces
``W`` in place, and MACs are counted as if factorised. Ranks are chosen greedily by the
relative output variance each step loses per MAC it saves (``--rule energy``), or by the
calibration KL one layer's truncation alone adds (``--rule kl``, slower). Scored on the
evaluation crops (disjoint photos). ::

    python benchmarks/lowrank_probe.py samples/generated/mobilenet_v2.onnx --targets 0.85 0.7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from block_drop import add_photo_args, load_photos, mean_kl, run  # noqa: E402
from fidelity import fidelity_metrics  # noqa: E402
from onnxprune.ir.macs import count_macs  # noqa: E402



def pointwise_convs(model: onnx.ModelProto) -> list[dict]:
    """Every 1×1, group-1 Conv with an initializer weight: name, weight, bias, input, pixels."""
    inits = {i.name: i for i in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.output]}
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("group", 1) != 1 or w.shape[2:] != (1, 1):
            continue
        has_bias = len(node.input) > 2 and node.input[2]
        b = numpy_helper.to_array(inits[node.input[2]]) if has_bias else np.zeros(w.shape[0], np.float32)
        shape = dims[node.output[0]]
        layers.append({"node": node.name, "w": w[:, :, 0, 0].astype(np.float64), "b": b.astype(np.float64),
                       "input": node.input[0], "winit": node.input[1], "binit": node.input[2] if has_bias else None,
                       "pixels": int(np.prod(shape[2:]))})
    return layers


def input_moments(model: onnx.ModelProto, layers: list[dict], x: np.ndarray, batch: int = 16) -> None:
    """Mean and covariance of each layer's input over images × pixels (dense network)."""
    names = sorted({layer["input"] for layer in layers})
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    from onnxprune.checks.runtime import create_session
    session = create_session(model, threads=2)
    feed = session.get_inputs()[0].name
    sums = {n: None for n in names}
    for i in range(0, len(x), batch):
        outs = session.run(names, {feed: x[i:i + batch]})
        for name, t in zip(names, outs):
            rows = t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1]).astype(np.float64)
            s = (len(rows), rows.sum(0), rows.T @ rows)
            sums[name] = s if sums[name] is None else tuple(a + b for a, b in zip(sums[name], s))
    for layer in layers:
        n, s1, s2 = sums[layer["input"]]
        mu = s1 / n
        layer["mu"], layer["cov"] = mu, s2 / n - np.outer(mu, mu)


def spectrum(layer: dict) -> None:
    w = layer["w"]
    cy = w @ layer["cov"] @ w.T
    lam, u = np.linalg.eigh(cy)
    order = np.argsort(lam)[::-1]
    layer["lam"], layer["u"] = np.clip(lam[order], 0, None), u[:, order]


def macs(layer: dict, rank: int | None) -> float:
    cout, cin = layer["w"].shape
    if rank is None:
        return layer["pixels"] * cin * cout
    return layer["pixels"] * rank * (cin + cout)


def ranks_for(layer: dict, step: int) -> list[int]:
    """Ranks that save MACs, from the largest down, in multiples of ``step``."""
    cout, cin = layer["w"].shape
    top = (cin * cout) // (cin + cout)
    top -= top % step
    return [r for r in range(top, 0, -step) if macs(layer, r) < macs(layer, None)]


def apply(model: onnx.ModelProto, layers: list[dict], ranks: dict) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in model.graph.initializer}
    for layer in layers:
        r = ranks.get(layer["node"])
        if r is None:
            continue
        u = layer["u"][:, :r]
        p = u @ u.T
        w = p @ layer["w"]
        b = layer["b"] + (np.eye(len(p)) - p) @ (layer["w"] @ layer["mu"])
        old = inits[layer["winit"]]
        new = numpy_helper.from_array(w[:, :, None, None].astype(np.float32), old.name)
        old.CopyFrom(new)
        if layer["binit"]:
            inits[layer["binit"]].CopyFrom(numpy_helper.from_array(b.astype(np.float32), layer["binit"]))
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.7])
    parser.add_argument("--rule", choices=("energy", "kl"), default="energy")
    parser.add_argument("--step", type=int, default=8)
    add_photo_args(parser, calib_size=512)
    args = parser.parse_args(argv)
    calib, evaluation = load_photos(args)
    model = onnx.load(args.model)
    dense = count_macs(model)[0]
    layers = pointwise_convs(model)
    input_moments(model, layers, calib)
    for layer in layers:
        spectrum(layer)
    ref_eval = run(model, evaluation)[0]
    ref_calib = run(model, calib[:128])[0] if args.rule == "kl" else None
    # cost of each (layer, rank): energy lost or calibration KL of that truncation alone
    cost = {}
    for layer in layers:
        total = layer["lam"].sum()
        for r in ranks_for(layer, args.step):
            if args.rule == "energy":
                cost[layer["node"], r] = layer["lam"][r:].sum() / max(total, 1e-30)
            else:
                trial = apply(model, layers, {layer["node"]: r})
                cost[layer["node"], r] = mean_kl(run(trial, calib[:128])[0], ref_calib)
        costs = [f"{r}:{cost[layer['node'], r]:.3g}" for r in ranks_for(layer, args.step)[:6]]
        print(layer["node"], layer["w"].shape, layer["pixels"], costs, flush=True)
    print("| target | MACs | agreement | confident | KL | layers factorised |")
    print("|---|---|---|---|---|---|")
    for target in args.targets:
        ranks: dict[str, int] = {}
        saved = 0.0
        by_name = {layer["node"]: layer for layer in layers}
        while (dense - saved) / dense > target:
            best = None
            for layer in layers:
                cur = ranks.get(layer["node"])
                options = [r for r in ranks_for(layer, args.step) if cur is None or r < cur]
                if not options:
                    continue
                r = options[0]
                gain = macs(layer, cur) - macs(layer, r)
                added = cost[layer["node"], r] - (cost[layer["node"], cur] if cur else 0.0)
                score = max(added, 0.0) / gain
                if best is None or score < best[0]:
                    best = (score, layer["node"], r, gain)
            if best is None:
                break
            _, name, r, gain = best
            ranks[name] = r
            saved += gain
        out = apply(model, layers, ranks)
        m = fidelity_metrics(run(out, evaluation)[0], ref_eval)
        chosen = ", ".join(f"{k}:{v}/{by_name[k]['w'].shape[0]}" for k, v in ranks.items())
        print(f"| {target} | {(dense - saved) / dense:.3f} | {m['agreement']:.1%} | {m['agreement_confident']:.1%} | "
              f"{m['mean_kl']:.3f} | {len(ranks)}: {chosen} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
