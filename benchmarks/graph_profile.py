#!/usr/bin/env python
"""Per-Conv latencies measured *inside* the whole graph (ORT's profiler), and the memory-traffic
terms of the analytical CPU cost model fitted to them.

Why in the graph: a Conv timed alone (``onnxprune autotune``) pays the session's run overhead and
the layout reorders around it, which in a graph it shares with its neighbours or does not pay at
all (ORT fuses Conv + Add + ReLU and keeps the blocked layout between Convs). The profiler times
each fused node of the real model, so the per-Conv times add up to the Conv part of the model's
time (reorders, pooling and the classifier are left out).

    python benchmarks/graph_profile.py collect ROWS.json MODEL.onnx [MODEL.onnx ...] [--batch 1,8]
    python benchmarks/graph_profile.py fit ROWS.json [ROWS.json ...]
    python benchmarks/graph_profile.py check [--samples benchmarks/results/cost_fit/*.json]

- ``collect``: per model and batch, ``--runs`` profiled runs after 5 warm-up ones (2 intra-op
  threads, random input), the median time of each Conv's fused node, with the Conv's shape. The
  network's name is the file's name up to ``__`` (``speed.py --out`` names) or, for
  ``fit_cost_model.py variants`` outputs, the folder's name.
- ``fit``: time ≈ s_m · (a·MACs by class + w·weight elements + m·map elements + overhead), one
  scale s_m per model and batch (the machine's speed drifts between models timed one after the
  other: only the split of a model's time between its Convs is trusted), non-negative least
  squares on relative error, alternating with the scales. Prints the coefficients and
  w / a_kxk, m / a_kxk: the MACs' time one weight / map element costs (``latency.Profile``'s
  ``mac_per_weight`` / ``mac_per_activation``). No held-out error here: the models were
  profiled one after the other, so their totals carry the drift the scales absorb; ``check``
  validates on interleaved whole-model timings instead.
- ``check``: the analytical model as the planner uses it (ratio of summed Conv times) on the
  recorded whole-model samples of ``fit_cost_model.py`` (interleaved whole-model timings of
  another day; its seeded variants overlap the ones profiled here), with the traffic terms as
  they are and set to zero: median |speedup error| and Spearman per network and batch. The
  batch-8 rows cost Convs at batch 8; the planner costs them at batch 1.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_cost_model import batches  # noqa: E402  (onnxprune bench's --batch rule)
from onnxprune.planning import cost_fit  # noqa: E402
from onnxprune.planning.latency import PROFILES, AnalyticalModel, ConvOp  # noqa: E402

FUSED = ("Add", "Relu", "Clip", "Sigmoid", "Mul")  # ops ORT may fuse into the Conv before it
CLASSES = ("mac_1x1", "mac_kxk", "mac_depthwise", "mac_grouped", "mac_unaligned")
FEATURES = (*CLASSES, "weight_elements", "map_elements", "overhead")


def conv_rows(path: str) -> list[dict]:
    """Each Conv's shape and the names its fused node may carry in the profile."""
    model = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    readers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    rows = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: a for a in node.attribute}
        group = attrs["group"].i if "group" in attrs else 1
        stride = list(attrs["strides"].ints) if "strides" in attrs else [1, 1]
        w, out, inp = weights[node.input[1]], dims[node.output[0]], dims.get(node.input[0])
        names, tensor = [node.output[0]], node.output[0]
        while len(readers.get(tensor, [])) == 1 and readers[tensor][0].op_type in FUSED and len(names) < 5:
            tensor = readers[tensor][0].output[0]
            names.append(tensor)
        rows.append({"conv": node.name, "c_out": w[0], "c_in": w[1] * group, "kernel": w[2:4], "group": group,
                     "stride": stride[:2], "out_hw": out[2:4], "in_hw": inp[2:4] if inp else None,
                     "names": [node.name, *names]})  # an unfused Conv keeps its node name
    return rows


def profile(path: str, batch: int, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level, options.enable_profiling = 2, 3, True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"graph_profile_{os.getpid()}")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 224 for d in declared.shape[1:]]  # symbolic H, W: 224
    feed = {declared.name: np.random.default_rng(0).random(shape, np.float32)}
    for _ in range(5 + runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    times = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["name"][:-len("_kernel_time")]].append(event["dur"])
    return {name: float(np.median(values[5:])) for name, values in times.items()}


def network_of(path: str) -> str:
    name = Path(path).name
    return name.split("__")[0] if "__" in name else Path(path).parent.name


def collect(args) -> int:
    rows = []
    for path in args.models:
        convs = conv_rows(path)
        for batch in args.batch:
            times = profile(path, batch, args.runs)
            # Two passes: first the keys of each Conv's own node name and output, then those of
            # the ops fused after it (a fused node carries the name of the *last* op it absorbed,
            # and two Convs feeding one Add share that chain, though only one absorbs it). A key
            # is used once; a Conv left without one is named.
            own = {c["conv"]: [k for name in c["names"][:2] for k in (name + "_nchwc", name) if k in times]
                   for c in convs}
            found = {name: keys[0] for name, keys in own.items() if keys}
            used = set(found.values())
            for conv in convs:
                if conv["conv"] not in found:
                    keys = [k for name in conv["names"][2:] for k in (name + "_nchwc", name)
                            if k in times and k not in used]
                    if keys:
                        found[conv["conv"]] = keys[0]
                        used.add(keys[0])
            matched = 0
            for conv in convs:
                if conv["conv"] not in found:
                    print(f"{path}: {conv['conv']} not found in the profile; left out", file=sys.stderr)
                    continue
                matched += 1
                rows.append({"network": network_of(path), "model": path, "batch": batch,
                             "us": times[found[conv["conv"]]], **{k: v for k, v in conv.items() if k != "names"}})
            print(f"{path} batch {batch}: {matched} of {len(convs)} Convs found in the profile", file=sys.stderr)
    Path(args.rows).write_text(json.dumps(rows))
    return 0


def features(row: dict) -> np.ndarray:
    """The row's Conv as the cost model sees it (``latency.ConvOp``: its MACs, and the weight and
    map elements the traffic terms charge, so the fit measures exactly what the model applies)."""
    op = ConvOp(row["c_in"], row["c_out"], row["group"], tuple(row["kernel"]), tuple(row["stride"]),
                row["out_hw"][0], row["out_hw"][1], row["batch"])
    f = dict.fromkeys(FEATURES, 0.0)
    if op.groups > 1 and op.groups == op.c_in == op.c_out:
        f["mac_depthwise"] = op.macs
    elif op.groups > 1:
        f["mac_grouped"] = op.macs
    elif op.c_in % 16 or op.c_out % 16:
        f["mac_unaligned"] = op.macs
    else:
        f["mac_1x1" if op.kernel == (1, 1) else "mac_kxk"] = op.macs
    f["weight_elements"], f["map_elements"], f["overhead"] = op.weight_elements, op.map_elements, 1.0
    return np.array([f[k] for k in FEATURES])


def fit_rows(rows: list[dict], rounds: int = 30) -> np.ndarray:
    from scipy.optimize import nnls

    x = np.array([features(r) for r in rows])
    y = np.array([r["us"] for r in rows])
    keys = sorted({(r["model"], r["batch"]) for r in rows})
    which = np.array([keys.index((r["model"], r["batch"])) for r in rows])
    scale, weight = np.ones(len(keys)), 1.0 / np.maximum(y, 1.0)
    norms = np.maximum(np.abs(x).max(axis=0), 1e-30)
    for _ in range(rounds):
        theta, _ = nnls(x / norms * (scale[which] * weight)[:, None], y * weight)
        theta = theta / norms
        predicted = x @ theta
        for k in range(len(keys)):
            m, w2 = which == k, weight[which == k] ** 2
            scale[k] = (predicted[m] * y[m] * w2).sum() / max((predicted[m] ** 2 * w2).sum(), 1e-30)
        scale /= np.exp(np.mean(np.log(scale)))
    return theta


def fit(args) -> int:
    rows = [row for path in args.rows for row in json.loads(Path(path).read_text())]
    theta = fit_rows(rows)
    kxk = theta[FEATURES.index("mac_kxk")]
    print("coefficients (us per unit):", {k: float(f"{v:.3g}") for k, v in zip(FEATURES, theta)})
    print(f"MACs' time per weight element {theta[FEATURES.index('weight_elements')] / kxk:.1f}, "
          f"per map element {theta[FEATURES.index('map_elements')] / kxk:.1f} "
          f"(latency.PROFILES['cpu']: {PROFILES['cpu'].mac_per_weight:g}, {PROFILES['cpu'].mac_per_activation:g})")
    return 0


class _NoTraffic(AnalyticalModel):
    """The analytical CPU model without its memory-traffic terms (for ``check``)."""

    def __init__(self):
        super().__init__("cpu")
        from dataclasses import replace

        self.profile = replace(self.profile, mac_per_weight=0.0, mac_per_activation=0.0)


def check(args) -> int:
    from scipy.stats import spearmanr

    samples, _ = cost_fit.load_samples(sorted(args.samples))
    for label, model in (("without traffic", _NoTraffic()), ("with traffic", AnalyticalModel("cpu"))):
        cells = []
        for family in sorted({s.family for s in samples}):
            for batch in sorted({s.batch for s in samples if s.family == family}):
                group = [s for s in samples if s.family == family and s.batch == batch]
                dense = next(s for s in group if s.dense)
                variants = [s for s in group if not s.dense]
                measured = np.array([dense.median_ms / s.median_ms for s in variants])
                predicted = np.array(cost_fit.planner_speedups(model, variants, dense))
                cells.append(f"{family}/b{batch} {np.median(np.abs(predicted - measured)):.3f} "
                             f"(rho {spearmanr(predicted, measured)[0]:.2f})")
        print(f"{label}: " + "; ".join(cells))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("collect")
    p.add_argument("rows")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=batches, default=[1, 8], help="comma-separated batch sizes")
    p.add_argument("--runs", type=int, default=20)
    p = sub.add_parser("fit")
    p.add_argument("rows", nargs="+")
    p = sub.add_parser("check")
    p.add_argument("--samples", nargs="+", default=glob.glob(str(ROOT / "benchmarks/results/cost_fit/*.json")))
    args = parser.parse_args(argv)
    return {"collect": collect, "fit": fit, "check": check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
