"""``onnxprune bench MODEL.onnx [MODEL.onnx ...] [options]``: interleaved latency comparison.

The timing itself is the library's (``onnxprune.checks.bench``; its docstring is this command's
``--help``); here the options become a ``BenchCommand``, checked once before any model is
loaded.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..checks import bench
from ..ir import model_io
from ..errors import ArgumentParser, UserError, run_reporting_errors
from ..ir.model_io import check_paths
from .prune import input_shape_arg


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="onnxprune bench", description=bench.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL.onnx", help="models to compare; ratios are to the first")
    p.add_argument("--provider", choices=sorted(bench.PROVIDERS), default="cpu")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes for models with a symbolic batch "
                                                "(fixed-batch models run at their own); default 1")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: all usable cores)")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per model and batch (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    p.add_argument("--cudnn-conv-algo-search", choices=("EXHAUSTIVE", "HEURISTIC", "DEFAULT"), default="EXHAUSTIVE")
    p.add_argument("--host-io", action="store_true",
                   help="cuda: feed numpy arrays and fetch outputs each run, timing the PCIe copies too "
                        "(default: inputs and outputs stay on the GPU via IOBinding)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="cuda: capture each model once as a CUDA graph and time its replays (ORT's "
                        "enable_cuda_graph; needs every node on the GPU and static shapes; not with --host-io)")
    p.add_argument("--nhwc", action="store_true",
                   help="cuda: the CUDA EP's channels-last kernels (ORT's prefer_nhwc)")
    p.add_argument("--input-shape", type=input_shape_arg, action="append", metavar="NAME=1x3x640x640",
                   help="size of an input's symbolic axes other than the batch, which --batch sets (DIMS alone "
                        "for a single-input model; once per input); default 224, as for pruning")
    p.add_argument("--json", metavar="out.json", help="also write the full report as JSON")
    return p


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch expects comma-separated positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batch expects comma-separated positive integers, got {text!r}")
    return batches


def main(argv: list[str] | None = None) -> int:
    return run_reporting_errors("onnxprune bench", _run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    command = BenchCommand.from_args(args)
    command.validate()
    return run(command)


@dataclass(frozen=True)
class BenchCommand:
    """One ``onnxprune bench``: the models (ratios to the first), the batch sizes, the session
    settings and the timing plan, and where the JSON goes."""

    models: tuple[str, ...]
    batches: tuple[int, ...]
    settings: bench.Settings
    repeat: int = 30
    warmup: int = 5
    json: str | None = None
    input_shapes: tuple = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchCommand":
        settings = bench.Settings(args.provider, args.threads, args.cudnn_conv_algo_search, args.host_io,
                                  cuda_graph=args.cuda_graph, prefer_nhwc=args.nhwc)
        return cls(tuple(args.models), tuple(parse_batches(args.batch)), settings, args.repeat, args.warmup,
                   args.json, tuple(args.input_shape or ()))

    def validate(self) -> None:
        if self.settings.threads < 0 or self.repeat < 1 or self.warmup < 0:
            raise UserError("--threads must be >= 0, --repeat >= 1, --warmup >= 0")
        self.settings.validate()
        check_paths([("MODEL.onnx", path) for path in self.models], [("--json", self.json)])


def run(command: BenchCommand) -> int:
    """A validated command: load the models, time them, print (and write the JSON)."""
    models = [model_io.load_model(path) for path in command.models]
    report = bench.compare(models, [str(p) for p in command.models], list(command.batches), command.settings,
                           command.repeat, command.warmup, input_shapes=command.input_shapes)
    print(bench.format_report(report))
    if command.json:
        model_io.write_text_atomic(command.json, json.dumps(report, indent=1) + "\n")
    return 0
