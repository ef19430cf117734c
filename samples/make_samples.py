#!/usr/bin/env python
"""Train the Fashion-MNIST sample models and export them (plus training snapshots) to ONNX.

Dataset
    Fashion-MNIST IDX files are read from ``/usr/share/datasets/fashion-mnist/`` (override with
    ``--data-dir``). On Debian/Ubuntu they come from ``apt-get install dataset-fashion-mnist``;
    otherwise download the four ``*-ubyte.gz`` files from
    https://github.com/zalandoresearch/fashion-mnist into a folder and pass ``--data-dir``.

Requirements (not runtime dependencies of onnxprune): ``pip install torch==2.13.0`` (CPU build),
onnx, onnxruntime(-gpu), numpy.

Outputs (default ``samples/``; models larger than ``--max-commit-mb`` go to ``samples/generated/``,
which is git-ignored):

* ``fmnist_calib.npz``  1,024 seeded training images (uint8 ``images`` N x 28 x 28, ``labels``)
* ``fmnist_eval.npz``   2,000 seeded test images, 200 per class
* ``fmnist_labels.json`` the 10 class names
* ``<model>.onnx``      final model, BatchNorm folded into Conv (opset 17, IR 8, symbolic batch)
* ``resnet20_bn.onnx``  ResNet-20 with BatchNormalization nodes kept
* ``<model>_snap_e<EPOCH>.onnx``  BN-folded snapshots inside the early "ticket window"; EPOCH is
  the (fractional) training epoch with two decimals, e.g. ``resnet20_snap_e1.20.onnx``
* ``sample_models.json`` manifest: params, MACs, accuracies, epochs, wall time, snapshots

Snapshot mapping: the TMI-GKP paper takes snapshots in epochs 35-70 of a 300-epoch schedule,
i.e. 11.7%-23.3% of training. We map that to the same *fraction of optimisation steps* of our
short schedule: ``--snapshots K`` evenly spaced points between 12% and 23% of all steps.

Every model takes raw pixels ``N x 1 x 28 x 28`` float32 in [0, 1]; padding to 32x32 and
normalisation are inside the graph.

Threads: the default is ONE torch thread. On the shared 2-core build machine, two OpenMP
threads competing with another busy process were ~10x slower than one thread (measured:
3.0 s vs 0.28 s per ResNet-20 step of 128 images). Use ``--threads 2`` on an idle machine.

Examples::

    python samples/make_samples.py                       # everything, default schedule
    python samples/make_samples.py --models resnet20 --epochs resnet20=10
    python samples/make_samples.py --data-only           # only the npz/json data files
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import gzip
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEFAULT_EPOCHS = {"resnet20": 6, "resnet56": 3, "wide_resnet": 1}
DEFAULT_TRAIN_SUBSET = {"resnet20": 0, "resnet56": 0, "wide_resnet": 20000}  # 0 = all 60k
DEFAULT_SNAPSHOTS = {"resnet20": 4, "resnet56": 3, "wide_resnet": 3}
TICKET_WINDOW = (0.12, 0.23)  # fraction of training; paper: epochs 35-70 of 300


# ----------------------------------------------------------------------------- data

def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(data_dir: Path):
    files = {
        "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in files.values() if not (data_dir / n).exists()]
    if missing:
        sys.exit(f"make_samples: Fashion-MNIST files missing in {data_dir}: {missing}; "
                 "install with `apt-get install dataset-fashion-mnist` or pass --data-dir")
    return {k: read_idx(data_dir / v) for k, v in files.items()}


def write_data_files(ds, out: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.choice(len(ds["train_y"]), 1024, replace=False))
    np.savez_compressed(out / "fmnist_calib.npz", images=ds["train_x"][calib_idx],
                        labels=ds["train_y"][calib_idx].astype(np.int64), indices=calib_idx)
    rng = np.random.default_rng(seed + 1)
    eval_idx = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(ds["test_y"] == c), 200, replace=False) for c in range(10)]))
    np.savez_compressed(out / "fmnist_eval.npz", images=ds["test_x"][eval_idx],
                        labels=ds["test_y"][eval_idx].astype(np.int64), indices=eval_idx)
    (out / "fmnist_labels.json").write_text(json.dumps(CLASS_NAMES, indent=1) + "\n")
    print(f"wrote {out}/fmnist_calib.npz (1024 train), fmnist_eval.npz (2000 test, 200/class), "
          "fmnist_labels.json", flush=True)


# ----------------------------------------------------------------------------- onnx helpers

def export_onnx(torch, model, path: Path, keep_bn: bool = False,
                example_shape: tuple = (3, 1, 28, 28), atol: float = 1e-3) -> None:
    """TorchScript exporter, opset 17, symbolic batch, IR version 8; checked and ORT-loaded."""
    import onnx
    import onnxruntime as ort

    m = copy.deepcopy(model).eval()
    x = torch.rand(*example_shape, generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=True,
    )
    if keep_bn:
        # PRESERVE on an eval-mode model skips the eval peephole that folds BN into Conv.
        kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(m, (x,), str(tmp), **kwargs)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    fold_constant_subgraphs(proto)
    proto.ir_version = 8  # onnxruntime 1.31 rejects IR 14; opset 17 needs IR >= 8
    proto.producer_name = "onnxprune-samples"
    ops = {n.op_type for n in proto.graph.node}
    if keep_bn and "BatchNormalization" not in ops:
        raise RuntimeError(f"{path.name}: BatchNormalization nodes were folded away")
    if not keep_bn and "BatchNormalization" in ops:
        raise RuntimeError(f"{path.name}: BatchNormalization nodes left in folded export")
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    err = float(np.abs(got - ref).max())
    if err > atol:
        raise RuntimeError(f"{path.name}: ORT vs torch max abs diff {err}")


def fold_constant_subgraphs(proto) -> None:
    """Replace node cones that do not depend on graph inputs by initializers.

    The TorchScript exporter writes ``F.pad`` as Constant/ConstantOfShape/Concat/Reshape/Slice/...
    computing the pads; folding them leaves a plain ``Pad(x, const_pads)`` that shape inference
    understands. Existing initializer names (the Conv weights) are untouched.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = proto.graph
    const = {i.name for i in g.initializer}
    folded = []
    for n in g.node:
        if all(i == "" or i in const for i in n.input):
            folded.append(n)
            const.update(n.output)
    if not folded:
        return
    folded_out = {o for n in folded for o in n.output}
    keep = [n for n in g.node if n not in folded]
    needed = sorted({i for n in keep for i in n.input if i in folded_out}
                    | {o.name for o in g.output if o.name in folded_out})
    sub = helper.make_model(
        helper.make_graph(folded, "fold", [], [helper.make_tensor_value_info(v, 0, None)
                                               for v in needed], list(g.initializer)),
        opset_imports=proto.opset_import)
    values = ReferenceEvaluator(sub).run(None, {})
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    inits = [i for i in g.initializer if i.name in used]
    inits += [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(needed, values)]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]


def conv_weights(path: Path) -> dict[str, tuple]:
    """{initializer name: shape} of every Conv weight input."""
    import onnx
    proto = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    return {n.input[1]: inits[n.input[1]] for n in proto.graph.node
            if n.op_type == "Conv" and n.input[1] in inits}


def count_macs(path: Path) -> int:
    """Conv + Gemm multiply-accumulates at batch 1 (from ONNX shape inference)."""
    import onnx
    from onnx import numpy_helper, shape_inference
    proto = onnx.load(str(path))
    inp = proto.graph.input[0]
    inp.type.tensor_type.shape.dim[0].dim_value = 1
    del proto.graph.value_info[:]
    for o in proto.graph.output:
        o.type.tensor_type.shape.dim[0].dim_value = 1
    proto = shape_inference.infer_shapes(proto)
    shapes = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: numpy_helper.to_array(i).shape for i in proto.graph.initializer}
    macs = 0
    for n in proto.graph.node:
        if n.op_type == "Conv":
            w = inits[n.input[1]]
            macs += int(np.prod(shapes[n.output[0]])) * int(np.prod(w[1:]))
        elif n.op_type == "Gemm":
            w = inits[n.input[1]]
            macs += int(np.prod(w))
    return macs


def ort_accuracy(path: Path, images_u8: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = images_u8.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    pred = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x), 500)])
    return float((pred == labels).mean())


def update_manifest(out_root: Path, name: str, entry: dict) -> None:
    path = out_root / "sample_models.json"
    with open(out_root / ".sample_models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = entry
        path.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    (out_root / ".sample_models.lock").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- training

def augment(torch, x):
    """Random crop 28 from zero-padded 32 (+-2 px shift) and random horizontal flip."""
    b = x.shape[0]
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    oy = torch.randint(0, 5, (b,))
    ox = torch.randint(0, 5, (b,))
    ar = torch.arange(28)
    rows = (oy[:, None] + ar)[:, :, None]
    cols = (ox[:, None] + ar)[:, None, :]
    out = xp[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_model(torch, name, ds, args, out_root: Path):
    from models import build

    epochs = args.epochs[name]
    subset = args.train_subset[name]
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build(name)
    n_params = sum(p.numel() for p in model.parameters())

    x_all = torch.from_numpy(ds["train_x"]).float().div_(255).unsqueeze(1)
    y_all = torch.from_numpy(ds["train_y"].astype(np.int64))
    if subset and subset < len(y_all):
        idx = torch.from_numpy(np.sort(rng.choice(len(y_all), subset, replace=False)))
        x_all, y_all = x_all[idx], y_all[idx]
    ev = np.load(out_root / "fmnist_eval.npz")
    x_ev = torch.from_numpy(ev["images"]).float().div_(255).unsqueeze(1)
    y_ev = torch.from_numpy(ev["labels"])

    bs = args.batch_size
    steps_per_epoch = math.ceil(len(y_all) / bs)
    total = steps_per_epoch * epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.25, div_factor=10,
                                                final_div_factor=100)
    k = args.snapshots[name]
    lo, hi = TICKET_WINDOW
    fracs = [lo + (hi - lo) * i / (k - 1) for i in range(k)] if k > 1 else ([lo] if k else [])
    snap_steps = {max(1, round(f * total)): f for f in fracs}

    big = n_params * 4 / 2**20 > args.max_commit_mb
    dest = out_root / "generated" if big else out_root
    dest.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] params={n_params} epochs={epochs} train_images={len(y_all)} "
          f"steps={total} snapshot_steps={sorted(snap_steps)} -> {dest}", flush=True)

    snapshots = []
    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y_all))
        run_loss = run_correct = run_n = 0.0
        for b in range(steps_per_epoch):
            bi = perm[b * bs:(b + 1) * bs]
            xb = augment(torch, x_all[bi])
            yb = y_all[bi]
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item() * len(yb)
            run_correct += (out.argmax(1) == yb).sum().item()
            run_n += len(yb)
            if step in snap_steps:
                ep = step / steps_per_epoch
                p = dest / f"{name}_snap_e{ep:.2f}.onnx"
                export_onnx(torch, model, p)
                model.train()
                snapshots.append({"file": str(p.relative_to(out_root)), "epoch": round(ep, 4),
                                  "step": step, "fraction_of_training": round(step / total, 4),
                                  "paper_equivalent_epoch": round(300 * step / total, 1)})
                print(f"[{name}] snapshot {p.name} (step {step}/{total})", flush=True)
            if b % 100 == 0:
                print(f"[{name}] ep {epoch + 1} step {b}/{steps_per_epoch} "
                      f"loss {run_loss / run_n:.4f} acc {run_correct / run_n:.4f} "
                      f"{time.time() - t0:.0f}s", flush=True)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_ev[i:i + 500]).argmax(1) for i in range(0, len(y_ev), 500)])
        acc = (pred == y_ev).float().mean().item()
        print(f"[{name}] epoch {epoch + 1}/{epochs} train_loss {run_loss / run_n:.4f} "
              f"train_acc {run_correct / run_n:.4f} eval2k_acc {acc:.4f} "
              f"time {time.time() - t0:.0f}s", flush=True)
    train_time = time.time() - t0

    model.eval()
    final = dest / f"{name}.onnx"
    export_onnx(torch, model, final)
    files = {"final": str(final.relative_to(out_root))}
    if name == "resnet20":
        bn = dest / f"{name}_bn.onnx"
        export_onnx(torch, model, bn, keep_bn=True)
        files["bn"] = str(bn.relative_to(out_root))
    ref = conv_weights(final)
    for s in snapshots:
        got = conv_weights(out_root / s["file"])
        if got != ref:
            raise RuntimeError(f"{s['file']}: Conv weight names/shapes differ from {final.name}")
    acc_full = ort_accuracy(final, ds["test_x"], ds["test_y"].astype(np.int64))
    acc_sub = ort_accuracy(final, ev["images"], ev["labels"])
    entry = {
        "files": files, "params": int(n_params), "macs": count_macs(final),
        "size_bytes": final.stat().st_size, "committed": not big,
        "epochs": epochs, "train_images": int(len(y_all)), "batch_size": bs,
        "optimizer": f"SGD nesterov m=0.9 wd={args.wd}, OneCycle max_lr={args.lr}",
        "train_wall_s": round(train_time, 1), "threads": args.threads, "seed": args.seed,
        "test_acc_full10k": round(acc_full, 4), "test_acc_eval2k": round(acc_sub, 4),
        "snapshots": snapshots,
    }
    if name == "resnet20":
        entry["test_acc_full10k_bn"] = round(
            ort_accuracy(dest / f"{name}_bn.onnx", ds["test_x"], ds["test_y"].astype(np.int64)), 4)
    update_manifest(out_root, name, entry)
    print(f"[{name}] done: full10k {acc_full:.4f} eval2k {acc_sub:.4f} "
          f"train {train_time:.0f}s macs {entry['macs']}", flush=True)


def print_table(out_root: Path) -> None:
    """Markdown table of the manifest (for samples/README.md)."""
    data = json.loads((out_root / "sample_models.json").read_text())
    print("| model | file | params | MACs (Conv+Gemm, batch 1) | top-1 full 10k | top-1 2k subset "
          "| epochs (train images) | train wall time | snapshots (epoch / % of training) |")
    print("|---|---|---:|---:|---:|---:|---|---:|---|")
    for name, e in data.items():
        snaps = ", ".join(f"{s['epoch']:.2f} ({100 * s['fraction_of_training']:.0f}%)"
                          for s in e["snapshots"])
        files = e["files"]["final"] + (f", {e['files']['bn']}" if "bn" in e["files"] else "")
        print(f"| {name} | {files} | {e['params']:,} | {e['macs'] / 1e6:.1f} M "
              f"| {100 * e['test_acc_full10k']:.2f}% | {100 * e['test_acc_eval2k']:.2f}% "
              f"| {e['epochs']} ({e['train_images']:,}) | {e['train_wall_s'] / 60:.1f} min "
              f"| {snaps} |")


def _kv(spec: list[str] | None, defaults: dict, cast=int) -> dict:
    out = dict(defaults)
    for item in spec or []:
        k, _, v = item.partition("=")
        if k not in defaults or not v:
            raise SystemExit(f"make_samples: bad value {item!r}; expected MODEL=N with MODEL in "
                             f"{sorted(defaults)}")
        out[k] = cast(v)
    return out


def main(argv=None) -> int:
    from models import MODEL_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    ap.add_argument("--epochs", nargs="*", metavar="MODEL=N",
                    help=f"per-model epochs (default {DEFAULT_EPOCHS})")
    ap.add_argument("--train-subset", nargs="*", metavar="MODEL=N",
                    help=f"train on N seeded training images, 0 = all (default "
                         f"{DEFAULT_TRAIN_SUBSET})")
    ap.add_argument("--snapshots", nargs="*", metavar="MODEL=K",
                    help=f"number of ticket-window snapshots (default {DEFAULT_SNAPSHOTS})")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.15)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--max-commit-mb", type=float, default=8.0,
                    help="models with larger fp32 weights go to OUT/generated/ (git-ignored)")
    ap.add_argument("--data-only", action="store_true", help="only write the npz/json files")
    ap.add_argument("--table", action="store_true",
                    help="print the manifest as a markdown table and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_table(args.out)
        return 0
    args.epochs = _kv(args.epochs, DEFAULT_EPOCHS)
    args.train_subset = _kv(args.train_subset, DEFAULT_TRAIN_SUBSET)
    args.snapshots = _kv(args.snapshots, DEFAULT_SNAPSHOTS)

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    ds = load_fmnist(args.data_dir)
    write_data_files(ds, args.out, args.seed)
    if not args.data_only:
        import torch
        torch.set_num_threads(args.threads)
        for name in args.models:
            train_model(torch, name, ds, args, args.out)
    print(f"make_samples: total wall time {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
