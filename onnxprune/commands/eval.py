"""``onnxprune eval MODEL.onnx [--data X.npz | --full | --subset] [--reference dense.onnx]
[--json out.json] [--batch-size N]``: top-1 accuracy of a classifier, and fidelity to a reference.

Data: ``--data`` needs nothing else installed (see ``eval_data.py`` for the formats). Without it
the data is the full 10,000-image Fashion-MNIST test set when
``/usr/share/datasets/fashion-mnist/t10k-*.gz`` exists (Debian package ``dataset-fashion-mnist``),
else the class-balanced 2,000-image subset ``samples/fmnist_eval.npz`` of a source checkout (a
wheel install has neither: the command says, in one line, to pass ``--data``); the report's
``data`` says which was used. These default locations are the command's, not the library's, and
are looked up when used (module attributes, so a test or an installation can point them
elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from ..errors import ArgumentParser, UserError, run_reporting_errors
from ..checks.eval_data import Dataset, load_idx, load_npz
from ..checks.evaluate import evaluate

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
FMNIST_TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
SAMPLES_DIR = Path(__file__).resolve().parent.parent.parent / "samples"  # a source checkout's
SUBSET_PATH = SAMPLES_DIR / "fmnist_eval.npz"
LABELS_PATH = SAMPLES_DIR / "fmnist_labels.json"


# ----------------------------------------------------------------------------- default data

def full_test_set_available(fmnist_dir: Union[str, Path, None] = None) -> bool:
    d = FMNIST_DIR if fmnist_dir is None else Path(fmnist_dir)
    return (d / FMNIST_TEST_IMAGES).is_file() and (d / FMNIST_TEST_LABELS).is_file()


def load_full_test_set(fmnist_dir: Union[str, Path, None] = None) -> Dataset:
    """The full 10,000-image Fashion-MNIST test set from the IDX files."""
    d = FMNIST_DIR if fmnist_dir is None else Path(fmnist_dir)
    if not full_test_set_available(d):
        raise UserError(f"full Fashion-MNIST test set not found in {d} (need {FMNIST_TEST_IMAGES} "
                        f"and {FMNIST_TEST_LABELS}; apt-get install dataset-fashion-mnist, or pass --data X.npz)")
    data = load_idx(d / FMNIST_TEST_IMAGES, d / FMNIST_TEST_LABELS, str(d))
    return data._replace(description=f"Fashion-MNIST test set, full {len(data.labels):,} images ({d})")


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
    come first), so the command can check its outputs against them before loading anything."""
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


def class_names() -> list[str] | None:
    """The Fashion-MNIST class names (``samples/fmnist_labels.json``) when installed, else None
    (the report then says ``class<i>``); used only for a model with 10 classes."""
    if LABELS_PATH.is_file():
        try:
            names = json.loads(LABELS_PATH.read_text())
            if isinstance(names, list) and len(names) == 10:
                return [str(n) for n in names]
        except (OSError, ValueError):
            pass
    return None


# ----------------------------------------------------------------------------- the command

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


@dataclass(frozen=True)
class EvalCommand:
    """One ``onnxprune eval``: what to evaluate, on which data, and where the JSON goes."""

    model: str
    data: str | None = None  # an explicit .npz; None: the default data, as ``prefer`` says
    prefer: str = "auto"  # "auto", "full" (--full) or "subset" (--subset)
    reference: str | None = None
    json: str | None = None
    batch_size: int = 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalCommand":
        prefer = "full" if args.full else "subset" if args.subset else "auto"
        return cls(args.model, args.data, prefer, args.reference, args.json, args.batch_size)

    def validate(self) -> None:
        """Every refusal before any work: options, the models, the data (default or given), the
        output path (never one of the inputs)."""
        from ..ir.model_io import check_paths, refuse_empty

        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        refuse_empty([("MODEL.onnx", self.model), ("--reference", self.reference), ("--data", self.data)])
        if not Path(self.model).is_file():
            raise UserError(f"model file not found: {Path(self.model)}")
        if self.reference is not None and not Path(self.reference).is_file():
            raise UserError(f"reference model file not found: {self.reference}")
        data_label = "--data" if self.data is not None else "the evaluation data"
        inputs = [("MODEL.onnx", self.model), ("--reference", self.reference),
                  *((data_label, str(path)) for path in data_files(self.data, prefer=self.prefer))]
        check_paths(inputs, [("--json", self.json)])


def main(argv: Sequence[str] | None = None) -> int:
    """``onnxprune eval`` entry point; returns the exit code (0 ok, 2 user error, see
    ``run_reporting_errors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, its one line already printed)
        return int(e.code or 0) if isinstance(e.code, int) else 0
    return run_reporting_errors("onnxprune eval", _run, args)


def _run(args: argparse.Namespace) -> int:
    command = EvalCommand.from_args(args)
    command.validate()
    return run(command)


def run(command: EvalCommand) -> int:
    """A validated command: load the data, evaluate, print (and write the JSON)."""
    from ..ir.model_io import write_text_atomic

    data = load_dataset(command.data, prefer=command.prefer)
    report = evaluate(Path(command.model), data, reference=command.reference, batch_size=command.batch_size,
                      class_names=class_names())
    print(format_report(report))
    if command.json:
        write_text_atomic(command.json, json.dumps(report, indent=1) + "\n")
        print(f"wrote {command.json}")
    return 0


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
