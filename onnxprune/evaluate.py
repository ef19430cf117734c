"""Accuracy harness: top-1 of an ONNX classifier, and fidelity against a reference model.

Library use::

    from onnxprune.evaluate import load_dataset, evaluate
    data = load_dataset(None)            # full Fashion-MNIST test set if installed, else 2k subset
    report = evaluate("pruned.onnx", data, reference="dense.onnx")
    report["top1"], report["reference"]["agreement"], report["reference"]["mean_kl"]

CLI (wired as ``onnxprune eval``)::

    onnxprune eval MODEL.onnx [--data X.npz | --full | --subset] [--reference dense.onnx]
                              [--json out.json] [--batch-size N]

Data: images are float32 ``N x 1 x H x W`` in [0, 1] (the sample models normalise inside
their graph). ``.npz`` files need ``images`` (uint8 0..255, or float already in [0, 1]; shape
``N x H x W`` or ``N x C x H x W``) and integer ``labels`` (N). ``--data`` needs nothing else
installed. Without it the data is the full 10,000-image Fashion-MNIST test set when
``/usr/share/datasets/fashion-mnist/t10k-*.gz`` exists (Debian package ``dataset-fashion-mnist``),
else the class-balanced 2,000-image subset ``samples/fmnist_eval.npz`` of a source checkout (a
wheel install has neither: pass ``--data``); the returned description says which was used.

Inference uses onnxruntime's CPUExecutionProvider so results do not depend on a GPU.
No torch import here: torch is not a runtime dependency.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    import onnx

from onnxprune.errors import ArgumentParser, UserError, run_reporting_errors

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
FMNIST_TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
SUBSET_PATH = SAMPLES_DIR / "fmnist_eval.npz"
LABELS_PATH = SAMPLES_DIR / "fmnist_labels.json"

ModelLike = Union[str, Path, bytes, np.ndarray, "onnx.ModelProto"]  # noqa: F821


class Dataset(NamedTuple):
    """``images`` float32 N x C x H x W in [0, 1]; ``labels`` int64 (N,); ``description``."""

    images: np.ndarray
    labels: np.ndarray
    description: str


# ----------------------------------------------------------------------------- data

def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, IndexError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None


def full_test_set_available(fmnist_dir: Union[str, Path, None] = None) -> bool:
    d = FMNIST_DIR if fmnist_dir is None else Path(fmnist_dir)
    return (d / FMNIST_TEST_IMAGES).is_file() and (d / FMNIST_TEST_LABELS).is_file()


def _to_float_images(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise UserError(f"{source}: 'images' must be N x H x W or N x C x H x W, "
                        f"got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(images.dtype, np.floating):
        return np.ascontiguousarray(images, dtype=np.float32)
    raise UserError(f"{source}: 'images' must be uint8 (0..255) or float in [0, 1], "
                    f"got dtype {images.dtype}")


def _check_labels(labels: np.ndarray, n: int, source: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise UserError(f"{source}: 'labels' must have shape ({n},) to match 'images', "
                        f"got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{source}: 'labels' must be integers, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise UserError(f"{source}: 'labels' must be non-negative class indices")
    return labels.astype(np.int64)


def load_npz(path: Union[str, Path]) -> Dataset:
    """Images and labels from an ``.npz`` with arrays ``images`` and ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"images", "labels"} <= keys:
                raise UserError(f"{path}: expected arrays 'images' and 'labels' in the .npz, "
                                f"found {sorted(keys) or 'none'}")
            images, labels = z["images"], z["labels"]
    except UserError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, pickle refusals ...
        raise UserError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    x = _to_float_images(images, str(path))
    y = _check_labels(labels, len(x), str(path))
    if len(x) == 0:
        raise UserError(f"{path}: contains no images")
    return Dataset(x, y, f"{path} ({len(x):,} images)")


def load_full_test_set(fmnist_dir: Union[str, Path, None] = None) -> Dataset:
    """The full 10,000-image Fashion-MNIST test set from the IDX files."""
    d = FMNIST_DIR if fmnist_dir is None else Path(fmnist_dir)
    if not full_test_set_available(d):
        raise UserError(f"full Fashion-MNIST test set not found in {d} (need {FMNIST_TEST_IMAGES} "
                        f"and {FMNIST_TEST_LABELS}; apt-get install dataset-fashion-mnist, or pass --data X.npz)")
    images = _read_idx(d / FMNIST_TEST_IMAGES)
    labels = _read_idx(d / FMNIST_TEST_LABELS)
    x = _to_float_images(images, str(d))
    y = _check_labels(labels, len(x), str(d))
    return Dataset(x, y, f"Fashion-MNIST test set, full {len(x):,} images ({d})")


def load_subset() -> Dataset:
    """The committed class-balanced 2,000-image Fashion-MNIST test subset."""
    if not SUBSET_PATH.is_file():
        raise UserError(f"committed subset {SUBSET_PATH} not found (it lives in the source "
                        "checkout's samples/); pass --data X.npz")
    d = load_npz(SUBSET_PATH)
    return Dataset(d.images, d.labels,
                   f"Fashion-MNIST test subset, {len(d.labels):,} images, class-balanced "
                   f"({SUBSET_PATH})")


def load_dataset(path: Union[str, Path, None] = None, *, prefer: str = "auto") -> Dataset:
    """Evaluation data as ``Dataset(images, labels, description)``.

    ``path``: an explicit ``.npz`` (wins over everything). Otherwise ``prefer``: ``"auto"`` uses
    the full 10k test set when its IDX files are installed, else the committed 2k subset (a
    UserError saying to pass ``--data`` when neither is installed); ``"full"`` requires the full
    set; ``"subset"`` forces the committed subset.
    """
    if path is not None:
        return load_npz(path)
    if _default_source(prefer) == "full":
        return load_full_test_set()
    return load_subset()


def _default_source(prefer: str) -> str:
    """``"full"`` or ``"subset"``: the data ``load_dataset(None, prefer=prefer)`` reads."""
    if prefer in ("full", "subset"):
        return prefer
    if prefer != "auto":
        raise ValueError(f"prefer must be 'auto', 'full' or 'subset', not {prefer!r}")
    if full_test_set_available():
        return "full"
    if not SUBSET_PATH.is_file():
        raise UserError(f"no evaluation data: pass --data X.npz (the default data is not installed: "
                        f"neither the Fashion-MNIST test set in {FMNIST_DIR} nor the subset {SUBSET_PATH})")
    return "subset"


def data_files(path: Union[str, Path, None] = None, *, prefer: str = "auto") -> list[Path]:
    """The files ``load_dataset(path, prefer=prefer)`` would read (its missing-data UserErrors
    come first), so the CLI can check its outputs against them before loading anything."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"data file not found: {path}")
        return [Path(path)]
    if _default_source(prefer) == "full":
        if not full_test_set_available():
            load_full_test_set()  # raises its "not found" error
        return [FMNIST_DIR / FMNIST_TEST_IMAGES, FMNIST_DIR / FMNIST_TEST_LABELS]
    if not SUBSET_PATH.is_file():
        load_subset()  # raises its "not found" error
    return [SUBSET_PATH]


def class_names(num_classes: int) -> list[str]:
    """Fashion-MNIST class names when there are 10 classes, else ``class<i>``."""
    if num_classes == 10 and LABELS_PATH.is_file():
        try:
            names = json.loads(LABELS_PATH.read_text())
            if isinstance(names, list) and len(names) == 10:
                return [str(n) for n in names]
        except (OSError, ValueError):
            pass
    return [f"class{i}" for i in range(num_classes)]


# ----------------------------------------------------------------------------- inference

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64}


def _session(model: ModelLike):
    from .runtime import create_session

    if isinstance(model, (str, Path)):
        p = Path(model)
        if not p.is_file():
            raise UserError(f"model file not found: {p}")
        src, label = str(p), str(p)
    elif isinstance(model, bytes):
        src, label = model, "<model bytes>"
    elif hasattr(model, "SerializeToString"):
        src, label = model.SerializeToString(), "<ModelProto>"
    else:
        raise TypeError(f"model must be a path, bytes or onnx.ModelProto, not {type(model)}")
    return create_session(src, load_error=label.replace("{", "{{").replace("}", "}}")
                          + ": not a loadable ONNX model ({reason})")


def predict_logits(model: ModelLike, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run ``model`` (path, bytes or ModelProto) on ``images`` with onnxruntime CPU.

    Uses the session's first input and first output; batches of ``batch_size`` (or the model's
    fixed batch size, if it has one). Returns the first output as float32 ``N x C``.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    sess = _session(model)
    inp = sess.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != images.ndim:
        raise UserError(f"model input '{inp.name}' has rank {len(shape)} {shape}, but the data "
                        f"images have shape {tuple(images.shape)}")
    for axis, (want, got) in enumerate(zip(shape[1:], images.shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and want != got:
            raise UserError(f"model input '{inp.name}' expects shape {shape}, but the data "
                            f"images have shape {tuple(images.shape)} (axis {axis})")
    if isinstance(shape[0], int) and shape[0] > 0:
        batch_size = shape[0]
    dtype = _ORT_TYPES.get(inp.type)
    if dtype is None:
        raise UserError(f"model input '{inp.name}' has type {inp.type}; expected a float tensor")
    outs = []
    n = len(images)
    for i in range(0, n, batch_size):
        xb = np.ascontiguousarray(images[i:i + batch_size], dtype=dtype)
        pad = 0
        if isinstance(shape[0], int) and shape[0] > 0 and len(xb) < shape[0]:
            pad = shape[0] - len(xb)  # fixed-batch model: pad the last batch
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], dtype=dtype)])
        try:
            y = sess.run(None, {inp.name: xb})[0]
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"inference failed on images of shape {tuple(xb.shape)}: {msg}") from None
        y = np.asarray(y)
        if pad:
            y = y[:len(y) - pad]
        outs.append(y.reshape(len(y), -1).astype(np.float32))
    if not outs:
        raise UserError("no images to evaluate")
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- metrics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    pred = logits.argmax(axis=1)
    return {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}


def compare_logits(logits: np.ndarray, ref_logits: np.ndarray) -> dict:
    """Fidelity of ``logits`` to ``ref_logits``: top-1 agreement, mean KL(ref || model),
    max/mean abs logit difference."""
    if logits.shape != ref_logits.shape:
        raise UserError(f"model outputs shape {logits.shape} but the reference outputs "
                        f"{ref_logits.shape}")
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    diff = np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64))
    return {
        "agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
        "mean_kl": float(max(kl.mean(), 0.0)),
        "max_kl": float(max(kl.max(), 0.0)),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
    }


def _logits_of(model, data: Dataset, batch_size: int) -> tuple[np.ndarray, str, float]:
    t0 = time.perf_counter()
    if isinstance(model, np.ndarray):
        logits, name = np.asarray(model, dtype=np.float32), "<logits>"
        if logits.ndim != 2 or len(logits) != len(data.labels):
            raise UserError(f"logits must be N x C with N = {len(data.labels)}, "
                            f"got {logits.shape}")
    else:
        logits = predict_logits(model, data.images, batch_size)
        name = str(model) if isinstance(model, (str, Path)) else f"<{type(model).__name__}>"
    return logits, name, time.perf_counter() - t0


def _as_dataset(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if data is None or isinstance(data, (str, Path)):
        return load_dataset(data)
    if isinstance(data, tuple) and len(data) in (2, 3):
        x = _to_float_images(np.asarray(data[0]), "data")
        y = _check_labels(np.asarray(data[1]), len(x), "data")
        return Dataset(x, y, data[2] if len(data) == 3 else f"{len(x):,} images")
    raise TypeError("data must be a Dataset, (images, labels[, description]), an .npz path or None")


def evaluate(model, data=None, reference=None, batch_size: int = 256) -> dict:
    """Top-1 accuracy of ``model`` on ``data``; with ``reference``, fidelity to it.

    ``model`` / ``reference``: ONNX path, bytes, ``onnx.ModelProto``, or precomputed logits
    (``np.ndarray`` N x C). ``data``: ``Dataset``, ``(images, labels)``, ``.npz`` path, or
    ``None`` (= ``load_dataset(None)``).

    Returns a JSON-serialisable dict::

        {"model", "data", "num_images", "top1", "correct", "seconds",
         "per_class": {"names", "accuracy" (list), "mean", "min", "min_class", "max", "max_class"},
         "reference": None | {"model", "top1", "agreement", "mean_kl", "max_kl",
                              "max_abs_logit_diff", "mean_abs_logit_diff"}}
    """
    ds = _as_dataset(data)
    logits, name, secs = _logits_of(model, ds, batch_size)
    num_classes = logits.shape[1]
    if ds.labels.max() >= num_classes:
        raise UserError(f"model outputs {num_classes} values per image but labels go up to "
                        f"{int(ds.labels.max())}")
    names = class_names(num_classes)
    pcs = per_class_accuracy(logits, ds.labels)
    present = sorted(pcs)
    accs = [pcs[c] for c in present]
    worst, best = present[int(np.argmin(accs))], present[int(np.argmax(accs))]
    report = {
        "model": name,
        "data": ds.description,
        "num_images": int(len(ds.labels)),
        "top1": top1_accuracy(logits, ds.labels),
        "correct": int((logits.argmax(1) == ds.labels).sum()),
        "seconds": round(secs, 3),
        "per_class": {
            "names": [names[c] for c in present],
            "accuracy": accs,
            "mean": float(np.mean(accs)),
            "min": pcs[worst], "min_class": names[worst],
            "max": pcs[best], "max_class": names[best],
        },
        "reference": None,
    }
    if reference is not None:
        ref_logits, ref_name, _ = _logits_of(reference, ds, batch_size)
        cmp = compare_logits(logits, ref_logits)
        report["reference"] = {"model": ref_name, "top1": top1_accuracy(ref_logits, ds.labels),
                               **cmp}
    return report


def format_report(r: dict) -> str:
    pc = r["per_class"]
    lines = [
        f"model:     {r['model']}",
        f"data:      {r['data']}",
        f"top-1:     {100 * r['top1']:.2f}% ({r['correct']:,}/{r['num_images']:,})",
        f"per-class: mean {100 * pc['mean']:.2f}%, worst {pc['min_class']} "
        f"{100 * pc['min']:.1f}%, best {pc['max_class']} {100 * pc['max']:.1f}%",
    ]
    ref = r.get("reference")
    if ref:
        lines += [
            f"reference: {ref['model']} (top-1 {100 * ref['top1']:.2f}%, "
            f"delta {100 * (r['top1'] - ref['top1']):+.2f} pts)",
            f"fidelity:  top-1 agreement {100 * ref['agreement']:.2f}%, mean KL "
            f"{ref['mean_kl']:.5f}, max |logit diff| {ref['max_abs_logit_diff']:.4g}",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="onnxprune eval",
        description="Top-1 accuracy of an ONNX classifier on Fashion-MNIST (or any .npz with "
                    "'images' and 'labels'), optionally with fidelity to a reference model.",
    )
    p.add_argument("model", help="ONNX model to evaluate")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="X.npz",
                     help="evaluation data: .npz with 'images' (uint8 or float in [0,1], "
                          "N x H x W or N x C x H x W) and 'labels'")
    src.add_argument("--full", action="store_true",
                     help=f"require the full 10k Fashion-MNIST test set from {FMNIST_DIR}")
    src.add_argument("--subset", action="store_true",
                     help="use the committed 2k class-balanced subset samples/fmnist_eval.npz")
    p.add_argument("--reference", metavar="DENSE.onnx",
                   help="reference model: report top-1 agreement, mean KL, max logit diff")
    p.add_argument("--json", metavar="OUT.json", help="also write the report as JSON")
    p.add_argument("--batch-size", type=int, default=256, metavar="N")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``onnxprune eval`` entry point; returns the exit code (0 ok, 2 user error, see
    ``run_reporting_errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return int(e.code or 0) if isinstance(e.code, int) else 0
    return run_reporting_errors("onnxprune eval", _run, args)


def _run(args) -> int:
    from .model_io import check_paths, write_text_atomic

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_path = Path(args.model)
    if not model_path.is_file():
        raise UserError(f"model file not found: {model_path}")
    if args.reference is not None and not Path(args.reference).is_file():
        raise UserError(f"reference model file not found: {args.reference}")
    prefer = "full" if args.full else "subset" if args.subset else "auto"
    data_label = "--data" if args.data is not None else "the evaluation data"
    inputs = [("MODEL.onnx", args.model), ("--reference", args.reference),
              *((data_label, str(path)) for path in data_files(args.data, prefer=prefer))]
    check_paths(inputs, [("--json", args.json)])
    data = load_dataset(args.data, prefer=prefer)
    report = evaluate(model_path, data, reference=args.reference, batch_size=args.batch_size)
    print(format_report(report))
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
