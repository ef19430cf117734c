#!/usr/bin/env python
"""Accuracy without fine-tuning: onnxprune with and without calibration data vs two peers.

For each Fashion-MNIST sample (samples/resnet20.onnx, samples/resnet56.onnx), at each rate and
grouping (G=8, the paper's, and ``--groups auto`` when onnxprune.planning.speed_plan exists), prints
top-1 on the evaluation set (the full 10k test set when /usr/share/datasets/fashion-mnist/
exists, else samples/fmnist_eval.npz) for:

- dense;
- onnxprune, no calibration (tickets-magnitude-increase clustering with the training snapshots
  samples/<model>_snap_e*.onnx when present);
- onnxprune --calib samples/fmnist_calib.npz --calib-size N for each N (default 128, 512);
- peers at the same MACs (bisection on their sparsity) and the same N calibration images:
  * onnxsim 0.8.1 ``apply_structured_wanda_pruning`` (Wanda channel scores from the calibration
    activations) followed by its ``recover_batch_norm`` fitted to the dense model's outputs;
  * Torch-Pruning 1.6 L1 filter pruning of the torch definition in samples/models.py loaded with
    the ONNX weights (Conv weights in order, folded bias into the BN), with BatchNorm statistics
    re-estimated on the same images so each kept channel gets back the dense channel's mean/std.

Requirements (benchmark-only): ``pip install onnxsim==0.8.1 "torch-pruning==1.6.*"`` and torch
(CPU). Each peer is skipped with a message when it cannot be imported or run.

Example::

    python benchmarks/accuracy.py                       # both models, rates 0.4375 and 0.625
    python benchmarks/accuracy.py --models resnet20 --calib-sizes 512 --json /tmp/acc.json
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
CALIB = SAMPLES / "fmnist_calib.npz"
sys.path.insert(0, str(ROOT))

from onnxprune.calibration.calib_data import load_calibration_inputs  # noqa: E402
from onnxprune.commands.eval import FMNIST_DIR, load_dataset  # noqa: E402  (the eval command's default data)
from onnxprune.checks.eval_data import Dataset, _read_idx, _to_float_images  # noqa: E402
from onnxprune.checks.evaluate import evaluate  # noqa: E402
from onnxprune.ir.macs import count_macs  # noqa: E402
from onnxprune.ir.normalize import normalize  # noqa: E402
from onnxprune.pipeline import PruneConfig, prune  # noqa: E402


# ----------------------------------------------------------------------------- onnxprune

def tickets_for(model_path: Path) -> list[str]:
    stem = model_path.stem
    return sorted(glob.glob(str(model_path.parent / f"{stem}_snap_e*.onnx")))


def run_onnxprune(model_path: Path, rate: float, groups, calib_size: int | None,
                  calib_target: str = "residual", calib_layers: str = "all"):
    """(pruned ModelProto, report dict, wall seconds); ``groups`` "auto+coupled=R": ``--groups auto
    --coupled-rate R`` (no snapshots: the coupled mode plans without them)."""
    coupled = None
    if isinstance(groups, str) and groups.startswith("auto+coupled="):
        groups, coupled = "auto", float(groups.split("=", 1)[1])
    config = PruneConfig(rate=rate, groups=groups, tickets=[] if coupled else tickets_for(model_path),
                         calib=str(CALIB) if calib_size else None, calib_size=calib_size,
                         calib_target=calib_target, calib_layers=calib_layers, coupled_rate=coupled)
    started = time.perf_counter()
    pruned, report = prune(str(model_path), config)
    return pruned, report.data, time.perf_counter() - started


# ----------------------------------------------------------------------------- peers

def calib_batches(model: onnx.ModelProto, n: int, batch: int = 64) -> list[dict]:
    feeds = load_calibration_inputs(str(CALIB), model, n)
    name = next(iter(feeds))
    return [{name: feeds[name][i:i + batch]} for i in range(0, n, batch)]


def match_macs(build, target: int, lo: float = 0.0, hi: float = 0.95, steps: int = 12):
    """Bisection on a peer's sparsity so its MACs land just at or above ``target``.

    ``build(sparsity) -> (model, macs)``; returns (model, macs, sparsity).
    """
    best = build(lo) + (lo,)
    for _ in range(steps):
        mid = (lo + hi) / 2
        model, macs = build(mid)
        if macs >= target:
            lo, best = mid, (model, macs, mid)
        else:
            hi = mid
        if abs(best[1] - target) / target < 0.005:
            break
    return best


def onnxsim_peer(model_path: Path, target_macs: int, n: int):
    """onnxsim 0.8.1 structured Wanda + BN recovery at ``target_macs``; (model, macs, sparsity)."""
    from onnxsim.bn_recovery import recover_batch_norm
    from onnxsim.pruning import apply_structured_wanda_pruning

    dense = onnx.load(str(model_path))
    batches = calib_batches(dense, n)

    def build(sparsity):
        pruned = apply_structured_wanda_pruning(copy.deepcopy(dense), calibration_data=batches, sparsity=sparsity)
        return pruned, count_macs(normalize(pruned))[0]

    pruned, macs, sparsity = match_macs(build, target_macs)
    try:
        pruned = recover_batch_norm(pruned, calibration_data=batches, target_model=dense)
    except Exception as exc:  # the recovery is the peer's own; report and go on without it
        print(f"  onnxsim recover_batch_norm failed ({type(exc).__name__}: {exc}); using Wanda alone")
    return pruned, macs, sparsity


def _load_models_module():
    spec = importlib.util.spec_from_file_location("fmnist_models", SAMPLES / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_from_onnx(name: str, model_path: Path):
    """The samples/models.py definition with the (BN-folded) ONNX weights, checked against ORT.

    Conv weights are mapped in order; each Conv's folded bias goes into its BatchNorm, whose
    statistics are set to the dense model's channel mean/var on the calibration images with a
    matching affine, so the BN is an identity (plus bias) that can later be re-estimated.
    """
    import torch

    net = _load_models_module().build(name).eval()
    graph = normalize(onnx.load(str(model_path))).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    t_convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    t_bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if len(convs) != len(t_convs) or len(t_bns) != len(t_convs) or len(gemms) != 1:
        raise RuntimeError(f"{len(convs)} ONNX Convs vs {len(t_convs)} torch Conv2d")
    with torch.no_grad():
        for node, conv, bn in zip(convs, t_convs, t_bns):
            w = inits[node.input[1]]
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise RuntimeError(f"shape mismatch at {node.name}: {w.shape} vs {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w.copy()))
            bias = inits[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0], np.float32)
            bn.weight.fill_(1.0), bn.bias.copy_(torch.from_numpy(bias))
            bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
        fc_w = inits[gemms[0].input[1]]
        net.fc.weight.copy_(torch.from_numpy(fc_w if fc_w.shape == tuple(net.fc.weight.shape) else fc_w.T))
        net.fc.bias.copy_(torch.from_numpy(inits[gemms[0].input[2]]))
    return net


def _set_bn_to_channel_stats(net, images) -> None:
    """Make every BN an identity that carries its input's per-channel mean/std.

    With running stats (mu, var) and affine weight sqrt(var + eps), bias mu + b, BN(x) = x + b;
    after pruning, re-estimating only the running stats makes each kept channel's output match
    the dense model's mean and std again (the standard BN-recalibration recovery)."""
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out: stats.__setitem__(m, inp[0].detach()))
             for bn in bns]
    with torch.no_grad():
        net(images)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for bn in bns:
            x = stats[bn].double()
            mu, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
            bias = bn.bias.double().clone()
            bn.running_mean.copy_(mu.float()), bn.running_var.copy_(var.float())
            bn.weight.copy_(torch.sqrt(var + bn.eps).float()), bn.bias.copy_((mu + bias).float())


def _recalibrate_bn(net, images) -> None:
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for i in range(0, len(images), 64):
            net(images[i:i + 64])
    net.eval()


def torch_pruning_peer(name: str, model_path: Path, target_macs: int, n: int, tmp: Path):
    """Torch-Pruning L1 filter pruning at ``target_macs`` + BN recalibration on the same images."""
    import torch
    import torch_pruning as tp

    torch.set_num_threads(1)
    dense = onnx.load(str(model_path))
    feeds = load_calibration_inputs(str(CALIB), dense, n)
    images = torch.from_numpy(next(iter(feeds.values())))
    base = torch_from_onnx(name, model_path)
    check = next(iter(feeds.values()))[:16]
    ref = evaluate_logits(dense, check)
    with torch.no_grad():
        got = base(torch.from_numpy(check)).numpy()
    if np.max(np.abs(got - ref)) > 1e-3 * max(1.0, np.max(np.abs(ref))):
        raise RuntimeError(f"torch model with the ONNX weights differs from ONNX by {np.max(np.abs(got - ref)):.3g}")
    _set_bn_to_channel_stats(base, images)
    example = torch.zeros(1, 1, 28, 28)

    def build(ratio):
        net = copy.deepcopy(base)
        if ratio > 0:
            imp = tp.importance.MagnitudeImportance(p=1, target_types=[torch.nn.Conv2d, torch.nn.Linear])
            tp.pruner.MetaPruner(net, example, importance=imp, pruning_ratio=ratio,
                                 ignored_layers=[net.fc]).step()
        return net, count_macs(_export(net, example, tmp / "tp_trial.onnx"))[0]

    net, macs, ratio = match_macs(build, target_macs, hi=0.9)
    _recalibrate_bn(net, images)
    return _export(net, example, tmp / "tp_final.onnx"), macs, ratio


def _export(net, example, path: Path) -> onnx.ModelProto:
    """torch -> ONNX, then onnxsim.simplify so the Pad's computed pads fold and shapes are static
    (count_macs needs them)."""
    import warnings

    import onnxsim
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          dynamo=False)
    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise RuntimeError("onnxsim.simplify could not check the exported Torch-Pruning model")
    return model


def evaluate_logits(model, images):
    from onnxprune.checks.verify import session

    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: images})[0]


# ----------------------------------------------------------------------------- driver

VALIDATION_SIZE = 10_000


def validation_set() -> Dataset:
    """10,000 seeded Fashion-MNIST *training* images that are not calibration images.

    For design decisions (ridge, targets, selection rules): choosing them on the test set would
    make the test-set numbers optimistic. The models were trained on these images for a few
    epochs, so absolute accuracy is higher here than on the test set; drops are what compare.
    """
    images = _read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = _read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    unused = np.setdiff1d(np.arange(len(labels)), np.load(CALIB)["indices"])
    pick = np.sort(np.random.default_rng(1).choice(unused, VALIDATION_SIZE, replace=False))
    return Dataset(_to_float_images(images[pick], "train"), labels[pick].astype(np.int64),
                   f"validation: {VALIDATION_SIZE:,} Fashion-MNIST training images not in {CALIB.name} (seed 1)")


def groupings() -> list:
    found = importlib.util.find_spec("onnxprune.planning.speed_plan") is not None
    return [8, "auto"] if found else [8]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.4375, 0.625])
    p.add_argument("--groups", nargs="+", default=None, help="groupings (default: 8 and auto when available)")
    p.add_argument("--coupled-rate", type=float, default=None,
                   help="also the grouping 'auto+coupled=R': --groups auto with --coupled-rate R (issue 10)")
    p.add_argument("--calib-sizes", nargs="+", type=int, default=[128, 512])
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--subset", action="store_true", help="evaluate on samples/fmnist_eval.npz (2k) only")
    p.add_argument("--validation", action="store_true",
                   help="evaluate on 10k training images outside the calibration set (for design decisions)")
    p.add_argument("--calib-target", choices=("residual", "output"), default="residual",
                   help="PruneConfig.calib_target for onnxprune --calib rows (default residual)")
    p.add_argument("--calib-layers", choices=("all", "pruned"), default="all",
                   help="PruneConfig.calib_layers for onnxprune --calib rows (default all)")
    p.add_argument("--json", help="also write all rows as JSON")
    args = p.parse_args(argv)
    groups_list = [g if g == "auto" else int(g) for g in args.groups] if args.groups else groupings()
    if args.coupled_rate is not None:
        groups_list.append(f"auto+coupled={args.coupled_rate:g}")
    if args.validation:
        data = validation_set()
    else:
        data = load_dataset(str(SAMPLES / "fmnist_eval.npz") if args.subset else None)
    print(f"evaluation data: {data.description}")
    tmp = Path("/tmp/onnxprune_accuracy")
    tmp.mkdir(exist_ok=True)
    rows = []

    def row(model, rate, groups, method, calib, macs, top1, dense, wall=None, extra=""):
        rows.append({"model": model, "rate": rate, "groups": groups, "method": method, "calib": calib,
                     "macs": macs, "top1": top1, "drop": None if dense is None else dense - top1,
                     "wall_s": wall, "note": extra})
        drop = "" if dense is None else f"{100 * (dense - top1):+6.2f}"
        wall_text = f"{wall:7.1f}" if wall is not None else "       "
        print(f"{model:9} {rate:6} {str(groups):>5} {method:34} {str(calib or '-'):>5} "
              f"{macs / 1e6:8.2f} {100 * top1:6.2f} {drop:>7} {wall_text}  {extra}", flush=True)

    print(f"{'model':9} {'rate':6} {'G':>5} {'method':34} {'calib':>5} {'MMACs':>8} {'top1':>6} "
          f"{'drop':>7} {'wall_s':>7}")
    for name in args.models:
        path = Path(name) if name.endswith(".onnx") else SAMPLES / f"{name}.onnx"
        name = path.stem.split("_")[0]  # architecture in samples/models.py (resnet20_snap_e2.30 -> resnet20)
        if not path.exists():
            print(f"{name}: {path} not found (run samples/make_samples.py); skipped")
            continue
        dense_model = onnx.load(str(path))
        dense = evaluate(dense_model, data)["top1"]
        row(name, "-", "-", "dense", None, count_macs(normalize(dense_model))[0], dense, None)
        for rate in args.rates:
            for groups in groups_list:
                try:
                    pruned, rep, wall = run_onnxprune(path, rate, groups, None)
                except Exception as exc:  # e.g. --groups auto while speed_plan is unavailable
                    print(f"{name:9} {rate:6} {str(groups):>5} onnxprune skipped: {type(exc).__name__}: {exc}")
                    continue
                target = rep["macs_after"]
                crit = next((e["criterion"] for e in rep["layers"] if "criterion" in e), "")
                row(name, rate, groups, "onnxprune (no calibration)", None, target,
                    evaluate(pruned, data)["top1"], dense, wall, f"criterion={crit}")
                for n in args.calib_sizes:
                    pruned, rep, wall = run_onnxprune(path, rate, groups, n, args.calib_target, args.calib_layers)
                    cal = rep["calibration"]
                    fid = cal["fidelity"]["calibrated"]
                    row(name, rate, groups, "onnxprune --calib", n, rep["macs_after"],
                        evaluate(pruned, data)["top1"], dense, wall,
                        f"calibrate {cal['wall_s']:.1f}s; held-out agree {fid['top1_agreement']:.3f} "
                        f"KL {fid['mean_kl']:.4f}")
                if args.no_peers or groups != groups_list[0]:
                    continue
                for n in args.calib_sizes:
                    _peer(row, name, rate, "onnxsim 0.8.1 Wanda + BN recovery", n, dense, data,
                          lambda: onnxsim_peer(path, target, n))
                    _peer(row, name, rate, "Torch-Pruning 1.6 L1 + BN recalib", n, dense, data,
                          lambda: torch_pruning_peer(name, path, target, n, tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _peer(row, name, rate, label, n, dense, data, build) -> None:
    started = time.perf_counter()
    try:
        model, macs, sparsity = build()
    except ImportError as exc:
        print(f"{name:9} {rate:6}       {label:34} {n:>5}  skipped: {exc} (pip install it)")
        return
    except Exception as exc:  # a peer failing must not stop the table
        print(f"{name:9} {rate:6}       {label:34} {n:>5}  skipped: {type(exc).__name__}: {str(exc)[:120]}")
        return
    row(name, rate, "-", label, n, macs, evaluate(model, data)["top1"], dense,
        time.perf_counter() - started, f"sparsity {sparsity:.3f}")


if __name__ == "__main__":
    sys.exit(main())
