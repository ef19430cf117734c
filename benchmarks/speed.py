"""Speed of pruned CNNs in ONNX Runtime: onnxprune (paper setting and --groups auto) vs peers.

For each model (random weights, 224×224, symbolic batch) this builds:
- dense: the exported model;
- onnxprune G=8: the paper's setting, rate 0.4375, 8 groups in every prunable Conv (kept kernels
  chosen by L1 magnitude unless --full-planner: same shapes, so the same latency);
- onnxsim: onnxsim 0.8.1 ``pruning.apply_structured_pruning`` (L1), sparsity bisected to the same MACs;
- torch-pruning: Torch-Pruning 1.6 ``MagnitudePruner`` (L1, round_to=16, fc left dense), pruning
  ratio bisected to the same MACs, then exported;
- onnxprune auto: ``--groups auto`` at the MACs the peers reached (see below), else at the target;
and times them all side by side with ``onnxprune.checks.bench.compare`` (interleaved, medians) at each batch.
Peers that cannot reach the MACs target report what they did reach. Needs torch, onnxsim==0.8.1,
torch-pruning==1.6.* (benchmark-only dependencies).

Equal MACs: the peers' bisections land at or below the target in their own steps (Torch-Pruning's
16-channel rounding: ResNet-50 at 0.572 for 0.58, 0.393 for 0.40), and onnxprune counts a
``--target-macs F`` as met up to F + 0.005, so side by side onnxprune used to run 2–3% more MACs
than Torch-Pruning: a head start worth about as much as the differences measured. The peers are
therefore built first and onnxprune is planned for the lowest MACs ratio a peer reached, minus that
tolerance, so it never runs more MACs than any peer (``--no-match-peers``: the target as given).
Only peers within ``MATCH_WINDOW`` (0.02) of the target are matched: one that missed it by more
(onnxsim cannot reach every target) would drag onnxprune as far off.
Each onnxprune row's last column is its per-round latency ratio to each peer, with a 95% interval
(``bench.paired_ratio``): below 1 is faster than the peer, an interval containing 1 is a tie.

    python benchmarks/speed.py [--models resnet18 resnet50 wide mobilenet_v2] [--batch 1,8] [--repeat 12]
"""

from __future__ import annotations

import argparse
import copy
import glob
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from torch_models import BUILDERS, export, randomize_bn  # noqa: E402
from onnxprune.ir.analysis import find_prunable_convs  # noqa: E402
from onnxprune.checks.bench import Settings, compare, paired_ratio  # noqa: E402
from onnxprune.ir.graph import GraphIndex  # noqa: E402
from onnxprune.gkp.kernel_selection import n_kept  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402
from onnxprune.planning.plan import LayerPlan, Plan  # noqa: E402
from onnxprune.ir.macs import count_macs, count_params  # noqa: E402
from onnxprune.ir.model_io import save_model  # noqa: E402
from onnxprune.pipeline import PruneConfig, prune  # noqa: E402
from onnxprune.planning.speed_plan import MACS_TOLERANCE  # noqa: E402

MODELS = ("resnet18", "resnet50", "wide", "mobilenet_v2")
MATCH_WINDOW = 0.02  # peers whose MACs ratio is this close to the target are matched
CLASSIFIER = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier"}


def log(msg: str) -> None:
    print(f"[speed] {msg}", file=sys.stderr, flush=True)


def macs_of(model: onnx.ModelProto) -> int:
    return count_macs(model)[0]


def bisect(fn, target: float, lo: float, hi: float, steps: int = 7):
    """Parameter in [lo, hi] whose fn(param) -> (macs_ratio, result) is closest to ``target``."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        ratio, result = fn(mid)
        if best is None or abs(ratio - target) < abs(best[0] - target):
            best = (ratio, result, mid)
        if ratio > target:
            lo = mid
        else:
            hi = mid
    return best


def magnitude_plan(dense: onnx.ModelProto, groups: int, rate: float) -> Plan:
    """A G-group plan with contiguous filter groups and the largest-L1 input channels per group.

    Latency depends only on the shapes a plan produces (G, kept channels per group, Gathers),
    not on which filters and kernels it picks, so this stands in for the clustering + greedy
    kernel selection, which takes many minutes on ResNet-50's 2048-channel layers
    (``--full-planner`` runs the real planner instead).
    """
    model = normalize(dense)
    index = GraphIndex(model.graph)
    prunable, skipped = find_prunable_convs(model, lambda info: groups, 16)
    layers = []
    for info in prunable:
        w = np.abs(index.constant(info.weight))
        per_group, n = info.c_out // groups, n_kept(info.c_in, rate)
        kept = []
        for g in range(groups):
            score = w[g * per_group:(g + 1) * per_group].sum(axis=(0, 2, 3))
            kept.append(sorted(int(c) for c in np.argsort(-score, kind="stable")[:n]))
        layers.append(LayerPlan(info.name, info.weight, info.c_out, info.c_in, list(info.kernel), groups,
                                list(range(info.c_out)), kept, "contiguous", "l1"))
    return Plan(layers, [{"node": s.name, "reason": s.reason} for s in skipped], {"rate": rate, "groups": groups})


def onnxsim_at(dense: onnx.ModelProto, target: float):
    from onnxsim.pruning import apply_structured_pruning

    folded = normalize(dense)  # onnxsim expects BatchNormalization fused into the Conv
    base = macs_of(dense)

    def run(s):
        pruned = apply_structured_pruning(copy.deepcopy(folded), sparsity=s, importance_norm="l1")
        return macs_of(pruned) / base, pruned

    ratio, model, s = bisect(run, target, 0.0, 0.9)
    return model, f"sparsity {s:.3f}"


def torch_pruning_at(name: str, net: torch.nn.Module, target: float, folder: Path):
    import torch_pruning as tp

    example = torch.randn(1, 3, 224, 224)
    base, _ = tp.utils.count_ops_and_params(net, example)

    def run(ratio):
        m = copy.deepcopy(net)
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, round_to=16,
                                           ignored_layers=[getattr(m, CLASSIFIER[name])])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, example)
        return macs / base, m

    ratio, m, r = bisect(run, target, 0.0, 0.8)
    path = folder / f"{name}_tp.onnx"
    export(m.eval(), str(path))
    return onnx.load(str(path)), f"ratio {r:.3f}"


def build_variants(name: str, folder: Path, args) -> tuple[list, list]:
    """(labels, models) for one architecture; the first is dense."""
    torch.manual_seed(0)
    if name == "wide":
        found = sorted(glob.glob(str(ROOT / "samples/generated/wide*.onnx"))
                       + glob.glob(str(ROOT / "samples/wide*.onnx")))
        if not found:
            log("wide: no samples/generated/wide*.onnx or samples/wide*.onnx; skipped")
            return [], []
        final = [f for f in found if "snap" not in Path(f).name] or found[-1:]  # else the latest snapshot
        net, dense_path = None, Path(final[0])
        log(f"wide: using {dense_path}")
    else:
        net = randomize_bn(BUILDERS[name]())
        dense_path = folder / f"{name}.onnx"
        export(net, str(dense_path))
    dense = onnx.load(str(dense_path))
    labels, models, notes, slugs = ["dense"], [dense], [""], ["dense"]

    t = time.perf_counter()
    config = PruneConfig(rate=0.4375, groups=8, verify=False)
    if not args.full_planner:
        config.plan = magnitude_plan(dense, groups=8, rate=0.4375)
    g8, report = prune(dense, config)
    target = report["macs_after"] / report["macs_before"] if args.target_macs is None else args.target_macs
    log(f"{name}: G=8 pruned in {time.perf_counter() - t:.0f}s, MACs x{target:.3f}")
    labels.append("onnxprune G=8 r=0.4375"), models.append(g8), notes.append("paper setting"), slugs.append("g8")

    peers = []  # (label, model, note, slug), built first: onnxprune is planned at the MACs they reach
    if "onnxsim" in args.peers:
        t = time.perf_counter()
        model, note = onnxsim_at(dense, target)
        log(f"{name}: onnxsim in {time.perf_counter() - t:.0f}s ({note})")
        peers.append(("onnxsim 0.8.1 structured", model, note, "onnxsim"))
    if "torch-pruning" in args.peers and net is not None:
        t = time.perf_counter()
        model, note = torch_pruning_at(name, net, target, folder)
        log(f"{name}: torch-pruning in {time.perf_counter() - t:.0f}s ({note})")
        peers.append(("Torch-Pruning 1.6 L1 r16", model, note, "torchpruning"))
    reached = [macs_of(model) / macs_of(dense) for _, model, _, _ in peers]
    close = [r for r in reached if abs(r - target) <= MATCH_WINDOW]  # a peer far off the target is not matched
    if args.match_peers and close:
        target = min([target, *close]) - MACS_TOLERANCE
        log(f"{name}: peers reached MACs x{', x'.join(f'{r:.3f}' for r in reached)}; "
            f"onnxprune planned for x{target:.4f}")

    for provider in args.auto_for or [args.provider]:
        for planner in args.planners:
            t = time.perf_counter()
            auto, report = prune(dense, PruneConfig(groups="auto", target_macs=target, provider=provider,
                                                    latency_table=args.latency_table, verify=False,
                                                    planner=planner))
            pruned = sum(1 for layer in report["layers"] if "skipped" not in layer)
            log(f"{name}: auto ({provider}, {planner} planner) pruned in {time.perf_counter() - t:.0f}s")
            labels.append(f"onnxprune auto --planner {planner} --provider {provider}"), models.append(auto)
            notes.append(f"{pruned} Convs pruned"), slugs.append(f"auto-{provider}-{planner}")

    for rate in args.coupled:
        for planner in args.planners:
            t = time.perf_counter()
            auto, report = prune(dense, PruneConfig(groups="auto", target_macs=target, provider=args.provider,
                                                    latency_table=args.latency_table, verify=False,
                                                    planner=planner, coupled_rate=None if rate == "off" else rate))
            groups = len((report["coupled"] or {}).get("groups", []))
            log(f"{name}: auto --coupled-rate {rate} ({planner} planner) pruned in {time.perf_counter() - t:.0f}s, "
                f"MACs x{report['macs_after'] / report['macs_before']:.3f}")
            labels.append(f"onnxprune auto --coupled-rate {rate} --planner {planner}"), models.append(auto)
            notes.append(f"{groups} coupled groups narrowed"), slugs.append(f"coupled{rate}-{planner}")

    for label, model, note, slug in peers:
        labels.append(label), models.append(model), notes.append(note), slugs.append(slug)
    for slug, model in zip(slugs, models):  # kept for benchmarks/cuda_speed.sh and re-runs of onnxprune bench
        save_model(model, folder / f"{name}__{slug}.onnx")
    return [(label, note) for label, note in zip(labels, notes)], models


def vs_peers(report: dict, i: int, peer_rows: list[int], labels) -> str:
    """For an onnxprune row: its per-round latency ratio to each peer at each batch, 95% interval."""
    if not labels[i][0].startswith("onnxprune auto"):  # the paper's G=8 row is at its own MACs
        return ""
    parts = []
    for j in peer_rows:
        cells = []
        for result in report["results"]:
            got = paired_ratio(result["rows"][i]["runs_ms"], result["rows"][j]["runs_ms"])
            low, high = got["paired_ratio_ci95"]
            cells.append(f"{got['paired_ratio']:.3f} [{low:.3f}, {high:.3f}]")
        parts.append(f"{labels[j][0].split()[0]}: " + " / ".join(cells))
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--peers", nargs="*", default=["onnxsim", "torch-pruning"],
                        choices=["onnxsim", "torch-pruning"])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--target-macs", type=float, default=None,
                        help="MACs fraction for the peers, and for auto unless a peer lands lower (see the module "
                             "docstring; default: what the G=8 setting reaches, ~0.58)")
    parser.add_argument("--coupled", nargs="*", type=lambda s: s if s in ("auto", "off") else float(s), default=[],
                        help="also build --groups auto with these --coupled-rate values (same MACs target)")
    parser.add_argument("--repeat", type=int, default=12, help="timed runs per model and batch (default 12)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--planners", nargs="+", choices=["fidelity", "speed"], default=["fidelity", "speed"],
                        help="auto planners to build (fidelity is the default; without data it ranks cuts by a "
                             "weight-norm proxy)")
    parser.add_argument("--full-planner", action="store_true",
                        help="plan G=8 with clustering + greedy kernel selection (slow on ResNet-50; same shapes)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="where to time (and what --groups auto plans for); cuda: see cuda_speed.sh")
    parser.add_argument("--out", default=None, help="folder for the models (default: a temp dir)")
    parser.add_argument("--auto-for", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="providers to plan --groups auto for, one model each (default: --provider)")
    parser.add_argument("--latency-table", default=None, help="measured table for the auto plans (autotune)")
    parser.add_argument("--no-match-peers", dest="match_peers", action="store_false",
                        help="plan onnxprune at the target as given, not at the lowest MACs a peer reached")
    parser.add_argument("--build-only", action="store_true",
                        help="write the models to --out and stop (time them elsewhere, e.g. cuda_speed.sh)")
    args = parser.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="onnxprune_speed_"))
    folder.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch.split(",")]
    settings = Settings(args.provider, args.threads)
    started = time.perf_counter()
    table = []
    for name in args.models:
        labels, models = build_variants(name, folder, args)
        if not models or args.build_only:
            continue
        t = time.perf_counter()
        report = compare(models, [label for label, _ in labels], batches, settings, repeat=args.repeat, warmup=3)
        log(f"{name}: timed in {time.perf_counter() - t:.0f}s")
        dense_macs, dense_params = macs_of(models[0]), count_params(models[0])
        peer_rows = [i for i, (label, _) in enumerate(labels) if not label.startswith(("onnxprune", "dense"))]
        for i, ((label, note), model) in enumerate(zip(labels, models)):
            cells = []
            for result in report["results"]:
                row = result["rows"][i]
                cells.append(f"{row['ratio_to_first']:.3f} ({row['speedup_vs_first']:.2f}x, {row['median_ms']:.1f} ms)")
            table.append(f"| {name} | {label} | {macs_of(model) / dense_macs:.3f} | "
                         f"{count_params(model) / dense_params:.3f} | " + " | ".join(cells) + f" | {note} | "
                         + vs_peers(report, i, peer_rows, labels) + " |")
    if args.build_only:
        log(f"models in {folder}")
        return
    s = settings.as_dict()
    algo = f", cudnn_conv_algo_search={s['cudnn_conv_algo_search']}" if "cudnn_conv_algo_search" in s else ""
    print(f"\nORT {s['onnxruntime']} {s['provider']}, {s['graph_optimization_level']}, "
          f"{s['intra_op_num_threads']} threads{algo}; interleaved, {args.repeat} timed runs each after 3 warm-up; "
          f"latency ratio = median / dense median (speedup, median); vs peers: per-round latency ratio to "
          f"each peer, batch {', '.join(map(str, batches))}, [95% interval]\n")
    print("| model | method | MACs ratio | params ratio | " +
          " | ".join(f"latency ratio batch {b}" for b in batches) + " | notes | vs peers |")
    print("|---|---|---|---|" + "---|" * len(batches) + "---|---|")
    print("\n".join(table))
    log(f"total {time.perf_counter() - started:.0f}s; models in {folder}")


if __name__ == "__main__":
    main()
