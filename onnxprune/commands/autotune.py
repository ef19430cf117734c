"""``onnxprune autotune MODEL.onnx [options]``: measure the per-layer latencies the speed planner asks for.

The measuring is the library's (``onnxprune.checks.autotune``; its docstring is this command's
``--help``); here the options become an ``AutotuneCommand``, and the paths and an existing
``--out`` table are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checks import autotune
from ..ir import model_io
from ..checks.bench import Settings
from ..errors import ArgumentParser, run_reporting_errors
from ..planning.latency import MeasuredTable
from ..ir.model_io import check_paths, refuse_empty
from ..ir.normalize import normalize
from ..ir.shapes import DEFAULT_DIM, single_working_shapes, sizes_text, with_input_shapes
from .prune import input_shape_arg
from ..pipeline import PruneConfig


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="onnxprune autotune", description=autotune.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", metavar="table.json",
                   help="latency table to write (entries already in it are kept); default MODEL.latency-PROVIDER.json")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all usable cores)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per op (default 10)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="measurement budget (default 600)")
    p.add_argument("--min-channels", type=int, default=16)
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE_NAME")
    p.add_argument("--input-shape", type=input_shape_arg, action="append", metavar="NAME=1x3x640x640",
                   help="size of an input's symbolic axes other than the batch, as for pruning (default 224): "
                        "the ops are measured at the shapes the planner will see with the same --input-shape")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors("onnxprune autotune", _run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    command = AutotuneCommand.from_args(args)
    table = command.validate()
    return run(command, table)


@dataclass(frozen=True)
class AutotuneCommand:
    """One ``onnxprune autotune``: the model, the table to write (default beside the model), the
    planner options whose candidate ops are measured, and the session and timing settings."""

    model: str
    out: Path
    config: PruneConfig  # the speed planner's view: groups auto, the provider, a MACs target to scan
    settings: Settings
    repeat: int = 10
    max_seconds: float = 600.0
    input_shapes: tuple = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AutotuneCommand":
        refuse_empty([("MODEL.onnx", args.model), ("--out", args.out)])  # before the default --out is derived
        out = Path(args.out) if args.out else Path(args.model).with_suffix(f".latency-{args.provider}.json")
        config = PruneConfig(groups="auto", provider=args.provider, min_channels=args.min_channels,
                             exclude=tuple(args.exclude), target_macs=0.5)
        return cls(args.model, out, config, Settings(args.provider, args.threads), args.repeat, args.max_seconds,
                   tuple(args.input_shape or ()))

    def validate(self) -> MeasuredTable | None:
        """The paths, and the existing table at ``--out`` (read now: a bad one fails before any work)."""
        # --out may be an existing table (it is read, extended and replaced atomically), never the model.
        check_paths([("MODEL.onnx", self.model)], [("--out", str(self.out))])
        provider = self.config.provider
        return MeasuredTable.load(self.out, provider, label="--out") if self.out.is_file() else None


def run(command: AutotuneCommand, table: MeasuredTable | None = None) -> int:
    """A validated command: measure the planner's ops into ``table`` (new if None) and save it."""
    log = lambda msg: print(f"onnxprune autotune: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    loaded = model_io.load_model(command.model)
    # the planner's ops at the working shapes the pruning command would use (same rules, same option)
    shapes = single_working_shapes(loaded, command.input_shapes, "the table is measured at one shape")
    if any(shape.source == "default" for shape in shapes.values()):
        log(f"measuring at input shapes {sizes_text(shapes)} (symbolic dims set to {DEFAULT_DIM} by default; "
            f"prune with the same --input-shape NAME=DIMS you give here)")
    model = normalize(with_input_shapes(loaded, shapes))
    table = autotune.autotune(model, command.config, command.settings, command.repeat, command.max_seconds, table,
                              log)
    table.save(command.out)
    print(f"onnxprune autotune: {len(table.entries)} ops in {command.out} (use --latency-table {command.out})",
          file=sys.stderr)
    return 0
