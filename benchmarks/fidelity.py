#!/usr/bin/env python
"""Fidelity of pruned ImageNet models on real photographs, with MACs and ORT CPU latency.

For each model (``samples/generated/{mobilenet_v2,efficientnet_lite0}.onnx``, made by
``samples/make_imagenet_samples.py``) and each *mode*, the onnxprune command line is run in a
subprocess (``python -m onnxprune.cli MODEL OUT MODE... --report R -q``), so any option the CLI
has, now or later, can be given in a mode. The pruned model is then compared with the dense one:

- on the evaluation photos (``samples/generated/photos_eval.npz``, from ``benchmarks/photos.py``;
  photographs never used for calibration): top-1 agreement with the dense model, top-5 overlap
  (mean |top5(dense) ∩ top5(pruned)| / 5) and mean KL(dense || pruned), via
  ``onnxprune.checks.evaluate.compare_logits``;
- on the 20 labelled ImageNet images of foolbox (``samples/generated/imagenet20.npz``): top-1
  accuracy, dense and pruned (a sanity check: 20 images);
- MACs and parameter ratios from the onnxprune report;
- latency ratio pruned / dense in ONNX Runtime CPU, batch 1, ``--threads`` (2) intra-op threads:
  all models of one network (dense first) timed side by side, interleaved, medians
  (``onnxprune.checks.bench.compare``).

A mode is an option string for onnxprune. ``default`` means no option; ``+calib`` adds
``--calib samples/generated/photos_calib.npz --calib-size N`` with ``--calib-size`` (default 256),
``+calib=N`` a given N. ``--extra "..."`` is appended to every mode. Examples::

    python benchmarks/fidelity.py                                    # the 5 default modes, both models
    python benchmarks/fidelity.py --models mobilenet_v2 --modes "default +calib" \\
        "--target-macs 0.7 +calib" "--target-macs 0.7 +calib --min-agreement 0.9" \\
        --eval-limit 128 --json /tmp/fid.json --plot /tmp/fid.png
    python benchmarks/fidelity.py --onnxprune-root /tmp/head         # another onnxprune checkout

Prints a markdown table and, with ``--json``, writes everything (per mode: the command, its wall
time and exit status, the metrics, the report's summary).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "samples" / "generated"
sys.path.insert(0, str(ROOT))

from onnxprune.checks.evaluate import compare_logits, predict_logits  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0")
DEFAULT_MODES = ("default", "default +calib", "--groups 8 --rate 0.4375 +calib",
                 "--target-macs 0.85 +calib", "--target-macs 0.7 +calib")


# ----------------------------------------------------------------------------- metrics
# (pure numpy: tested by tests/test_fidelity_harness.py)

def topk_overlap(logits: np.ndarray, ref_logits: np.ndarray, k: int = 5) -> float:
    """Mean over samples of |topk(ref) ∩ topk(model)| / k."""
    k = min(k, logits.shape[1])
    a = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    b = np.argpartition(-ref_logits, k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))


CONFIDENT = 0.5  # the reference's top-1 probability from which a prediction counts as confident


def fidelity_metrics(logits: np.ndarray, ref_logits: np.ndarray) -> dict:
    """``compare_logits`` (agreement, mean/max KL(ref || model), logit differences) + top-5
    overlap, whether the reference's top-1 is in the model's top-5, and top-1 agreement on the
    samples the reference is confident about (top-1 probability >= ``CONFIDENT``).

    Why the last one: on real photos many predictions of a pretrained net are near-ties, which
    any perturbation flips (weight-only int8 rounding costs MobileNetV2 13 points of plain
    agreement, see agreement_floor.py); agreement where the reference is sure of itself is closer
    to what a user sees as "the model still works"."""
    m = compare_logits(logits, ref_logits)
    shifted = ref_logits - ref_logits.max(1, keepdims=True)
    ref_top1_prob = 1.0 / np.exp(shifted).sum(1)
    confident = ref_top1_prob >= CONFIDENT
    same = logits.argmax(1) == ref_logits.argmax(1)
    m["agreement_confident"] = float(same[confident].mean()) if confident.any() else None
    m["confident_samples"] = int(confident.sum())
    k = min(5, logits.shape[1])
    top5 = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    m["top5_overlap"] = topk_overlap(logits, ref_logits, 5)
    m["ref_top1_in_top5"] = float(np.mean((top5 == ref_logits.argmax(1)[:, None]).any(1)))
    m["samples"] = int(len(logits))
    return m


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# ----------------------------------------------------------------------------- modes

def mode_argv(mode: str, calib: Path, calib_size: int, extra: str = "") -> list[str]:
    """onnxprune options for a mode string (see the module docstring)."""
    out = []
    for tok in shlex.split(mode) + shlex.split(extra):
        if tok == "default":
            continue
        if tok == "+calib" or tok.startswith("+calib="):
            n = int(tok.split("=", 1)[1]) if "=" in tok else calib_size
            out += ["--calib", str(calib), "--calib-size", str(n)]
        else:
            out.append(tok)
    return out


def calib_count(argv: list[str]) -> int | None:
    if "--calib" not in argv:
        return None
    if "--calib-size" in argv:
        return int(argv[argv.index("--calib-size") + 1])
    return -1  # all


def run_onnxprune(cmd: list[str], model: Path, out: Path, argv: list[str], report: Path,
                  root: Path | None, timeout: float | None) -> dict:
    """Run the CLI; ``root``: a folder holding the ``onnxprune`` package to run instead."""
    full = [*cmd, str(model), str(out), *argv, "--report", str(report), "-q"]
    env = dict(os.environ)
    cwd = None
    if root is not None:
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        cwd = str(root)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(full, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        rc, err = r.returncode, r.stderr.strip()
    except subprocess.TimeoutExpired:
        rc, err = 124, f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    return {"command": " ".join(shlex.quote(c) for c in full), "rc": rc, "wall_s": round(wall, 1),
            "stderr_tail": err.splitlines()[-3:] if err else []}


def report_summary(rep: dict) -> dict:
    """The report fields the table uses (absent ones are None)."""
    mb, ma = rep.get("macs_before"), rep.get("macs_after")
    pb, pa = rep.get("params_before"), rep.get("params_after")
    calib = rep.get("calibration") or {}
    fid = calib.get("fidelity") or {}
    out = {
        "macs_before": mb, "macs_after": ma, "macs_ratio": ma / mb if mb and ma is not None else None,
        "params_ratio": pa / pb if pb and pa is not None else None,
        "convs_pruned": rep.get("convs_pruned"), "convs_skipped": rep.get("convs_skipped"),
        "heldout_agreement": (fid.get("calibrated") or {}).get("top1_agreement"),
        "heldout_samples": fid.get("samples"),
        "calibrate_s": calib.get("wall_s") or calib.get("seconds"),
    }
    for key in ("budget", "auto", "timings_s"):
        if rep.get(key) is not None:
            out[key] = rep[key]
    return out


# ----------------------------------------------------------------------------- data

def load_eval(path: Path, limit: int | None) -> tuple[np.ndarray, dict]:
    if not path.is_file():
        raise SystemExit(f"fidelity: {path} missing; run python benchmarks/photos.py")
    with np.load(path, allow_pickle=False) as d:
        x = d["input"]
        source = d["source"] if "source" in d.files else np.arange(len(x))
    if limit:
        x, source = x[:limit], source[:limit]
    return x, {"file": str(path), "samples": int(len(x)), "photos": int(len(np.unique(source)))}


def load_imagenet20(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if path.is_file():
        with np.load(path, allow_pickle=False) as d:
            return d["images"], d["labels"]
    try:  # build it from the foolbox package's data folder (installed with --no-deps)
        import importlib.util

        sys.path.insert(0, str(ROOT / "samples"))
        from make_imagenet_samples import load_imagenet20 as load

        spec = importlib.util.find_spec("foolbox")
        if spec is None or not spec.submodule_search_locations:
            return None
        images, labels, _ = load(Path(list(spec.submodule_search_locations)[0]))
        return images, labels
    except (ImportError, SystemExit):
        return None


def as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255) if x.dtype == np.uint8 else x.astype(np.float32)


# ----------------------------------------------------------------------------- latency

def latency(paths: list[Path], labels: list[str], threads: int, repeat: int, warmup: int) -> dict[str, dict]:
    import onnx

    from onnxprune.checks.bench import Settings, compare

    rep = compare([onnx.load(str(p)) for p in paths], labels, [1], Settings(provider="cpu", threads=threads),
                  repeat=repeat, warmup=warmup)
    return {row["model"]: {"median_ms": row["median_ms"], "p90_ms": row["p90_ms"],
                           "latency_ratio": row["ratio_to_first"]} for row in rep["results"][0]["rows"]}


# ----------------------------------------------------------------------------- output

def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def format_table(results: dict) -> str:
    head = ("| model | mode | calib | MACs ratio | params ratio | top-1 agree | agree, confident | top-5 overlap | "
            "mean KL | imagenet20 top-1 | latency ratio (ms) | prune wall s | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, r in results.items():
        d = r["dense"]
        lines.append(f"| {model} | dense | – | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 0 | "
                     f"{_f(d.get('imagenet20_top1'), '.2f')} | "
                     f"1.000 ({_f(d.get('median_ms'), '.2f')}) | – | eval {r['eval']['samples']} crops / "
                     f"{r['eval']['photos']} photos |")
        for row in r["rows"]:
            m, s = row.get("metrics") or {}, row.get("report") or {}
            notes = []
            if row["run"]["rc"] != 0:
                notes.append(f"FAILED rc={row['run']['rc']}: {' / '.join(row['run']['stderr_tail'])[:120]}")
            if s.get("convs_pruned") is not None:
                notes.append(f"{s['convs_pruned']} Convs pruned")
            if s.get("heldout_agreement") is not None:
                notes.append(f"held-out agree {s['heldout_agreement']:.3f}")
            calib = row["calib"]
            lines.append(
                f"| {model} | {row['mode']} | {'–' if calib is None else ('all' if calib < 0 else calib)} | "
                f"{_f(s.get('macs_ratio'), '.3f')} | {_f(s.get('params_ratio'), '.3f')} | "
                f"{_f(m.get('agreement'), '.3f')} | {_f(m.get('agreement_confident'), '.3f')} | "
                f"{_f(m.get('top5_overlap'), '.3f')} | {_f(m.get('mean_kl'), '.4f')} | "
                f"{_f(row.get('imagenet20_top1'), '.2f')} | {_f(row.get('latency_ratio'), '.3f')} "
                f"({_f(row.get('median_ms'), '.2f')}) | {row['run']['wall_s']:.1f} | {'; '.join(notes)} |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower x and higher y is better), sorted by x."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5), squeeze=False)
    for ax, (model, r) in zip(axes[0], results.items()):
        pts, names, macs = [(1.0, 1.0)], ["dense"], [1.0]
        for row in r["rows"]:
            if row.get("latency_ratio") is None or not row.get("metrics"):
                continue
            pts.append((row["latency_ratio"], row["metrics"]["agreement"]))
            names.append(row["mode"])
            macs.append((row.get("report") or {}).get("macs_ratio"))
        xs, ys = zip(*pts)
        ax.scatter(xs[1:], ys[1:], c="tab:blue", zorder=3)
        ax.scatter([1.0], [1.0], c="black", marker="s", zorder=3)
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", c="tab:orange", zorder=2,
                label="Pareto front")
        offsets = [(5, -12), (5, 4), (5, -26), (5, 16)]
        for i, ((x, y), name, mr) in enumerate(zip(pts, names, macs)):
            ax.annotate(f"{name} (MACs {mr:.2f})" if mr is not None else name, (x, y), fontsize=7,
                        xytext=offsets[i % len(offsets)], textcoords="offset points")
        ax.margins(x=0.35, y=0.08)
        ax.set_xlabel("latency ratio pruned / dense (ORT CPU, batch 1; lower is faster)")
        ax.set_ylabel(f"top-1 agreement with dense ({r['eval']['samples']} photo crops)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def retime(args) -> int:
    old = json.loads(args.retime.read_text())
    results = old["results"]
    for model, r in results.items():
        ok = [row for row in r["rows"] if row.get("metrics") and Path(row["file"]).is_file()]
        lat = latency([Path(r["dense"]["file"])] + [Path(row["file"]) for row in ok],
                      ["dense"] + [row["mode"] for row in ok], args.threads, args.repeat, args.warmup)
        r["dense"]["median_ms"] = lat["dense"]["median_ms"]
        for row in ok:
            row.update(lat[row["mode"]])
    old["settings"]["latency"] = {"provider": "cpu", "threads": args.threads, "batch": 1, "repeat": args.repeat,
                                  "warmup": args.warmup, "retimed_from": str(args.retime)}
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(old, indent=1, default=str) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="names in samples/generated/ or paths to .onnx (default: both ImageNet samples)")
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="onnxprune option strings")
    ap.add_argument("--extra", default="", help="options appended to every mode")
    ap.add_argument("--calib", type=Path, default=GENERATED / "photos_calib.npz", help="data for +calib")
    ap.add_argument("--calib-size", type=int, default=256, help="N for +calib (default 256)")
    ap.add_argument("--eval", type=Path, default=GENERATED / "photos_eval.npz")
    ap.add_argument("--eval-limit", type=int, help="use the first N evaluation crops (round-robin order: "
                                                   "as many photos as possible)")
    ap.add_argument("--imagenet20", type=Path, default=GENERATED / "imagenet20.npz")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for latency (default 2)")
    ap.add_argument("--repeat", type=int, default=100, help="timed interleaved rounds (default 100)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--onnxprune-root", type=Path,
                    help="folder holding the onnxprune package to run (e.g. a 'git archive' of another commit)")
    ap.add_argument("--onnxprune-cmd", default=f"{shlex.quote(sys.executable)} -m onnxprune.cli",
                    help="command that runs the onnxprune CLI")
    ap.add_argument("--timeout", type=float, help="seconds per onnxprune run")
    ap.add_argument("--keep", type=Path, help="keep the pruned models and reports in this folder")
    ap.add_argument("--retime", type=Path, metavar="OLD.json",
                    help="only re-measure the latency of the models kept by an earlier run (--keep) whose "
                         "--json this is, e.g. when the machine was busy; writes --json/--plot anew")
    ap.add_argument("--json", type=Path, help="write all results as JSON")
    ap.add_argument("--plot", type=Path, help="write a Pareto plot (agreement vs latency ratio) as PNG")
    args = ap.parse_args(argv)

    t_start = time.time()
    if args.retime:
        return retime(args)
    x_eval, eval_info = load_eval(args.eval, args.eval_limit)
    xf = as_float(x_eval)
    in20 = load_imagenet20(args.imagenet20)
    cmd = shlex.split(args.onnxprune_cmd)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="onnxprune_fidelity_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        path = Path(name) if name.endswith(".onnx") else GENERATED / f"{name}.onnx"
        if not path.is_file():
            raise SystemExit(f"fidelity: {path} missing; run python samples/make_imagenet_samples.py")
        model = path.stem
        dense_logits = predict_logits(str(path), xf, batch_size=64)
        dense = {"file": str(path), "eval_top1_classes": int(len(np.unique(dense_logits.argmax(1))))}
        dense20 = None
        if in20 is not None:
            dense20 = predict_logits(str(path), as_float(in20[0]))
            dense["imagenet20_top1"] = top1(dense20, in20[1])
        rows = []
        for i, mode in enumerate(args.modes):
            argv_m = mode_argv(mode, args.calib, args.calib_size, args.extra)
            out = workdir / f"{model}_{i}.onnx"
            rep_path = workdir / f"{model}_{i}.json"
            print(f"fidelity: {model} [{mode}] ...", file=sys.stderr, flush=True)
            run = run_onnxprune(cmd, path, out, argv_m, rep_path, args.onnxprune_root, args.timeout)
            row = {"mode": mode, "argv": argv_m, "calib": calib_count(argv_m), "run": run, "file": str(out)}
            if run["rc"] == 0 and out.is_file():
                rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
                row["report"] = report_summary(rep)
                logits = predict_logits(str(out), xf, batch_size=64)
                row["metrics"] = fidelity_metrics(logits, dense_logits)
                if in20 is not None:
                    l20 = predict_logits(str(out), as_float(in20[0]))
                    row["imagenet20_top1"] = top1(l20, in20[1])
                    row["imagenet20_agreement"] = float((l20.argmax(1) == dense20.argmax(1)).mean())
            print(f"fidelity: {model} [{mode}] rc={run['rc']} {run['wall_s']:.1f}s "
                  f"agree={_f((row.get('metrics') or {}).get('agreement'), '.3f')}", file=sys.stderr, flush=True)
            rows.append(row)
        if not args.no_latency:
            ok = [r for r in rows if r.get("metrics")]
            lat = latency([path] + [Path(r["file"]) for r in ok], ["dense"] + [r["mode"] for r in ok],
                          args.threads, args.repeat, args.warmup)
            dense["median_ms"] = lat["dense"]["median_ms"]
            for r in ok:
                r.update(lat[r["mode"]])
        results[model] = {"dense": dense, "eval": eval_info, "rows": rows}

    print(format_table(results))
    meta = {"eval": eval_info, "calib": str(args.calib), "calib_size": args.calib_size,
            "imagenet20": None if in20 is None else str(args.imagenet20),
            "latency": None if args.no_latency else {"provider": "cpu", "threads": args.threads, "batch": 1,
                                                     "repeat": args.repeat, "warmup": args.warmup},
            "onnxprune_cmd": args.onnxprune_cmd, "onnxprune_root": str(args.onnxprune_root or ROOT),
            "wall_s": round(time.time() - t_start, 1)}
    if args.json:
        args.json.write_text(json.dumps({"settings": meta, "results": results}, indent=1, default=str) + "\n")
    if args.plot:
        plot(results, args.plot)
    print(f"fidelity: total wall time {meta['wall_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
