"""``onnxprune IN.onnx OUT.onnx [options]``: the default command, pruning a model.

Exit codes: 0 success; 2 bad usage or an input that cannot be processed (one line on stderr,
no traceback, no output written); 1 when the pass itself fails (e.g. verification); 3 when the
output misses a budget (CI gates, see gate.py: no model at OUT, the report and summary still
written); 130 Ctrl-C. Every output must differ from every input and from the other outputs
(checked before any work); all outputs are written together at the end, or none.

Flow: ``build_parser`` -> ``PruneCommand.from_args`` (the files, the console options and the
library's ``PruneConfig``) -> ``PruneCommand.validate`` (every refusal that needs no model,
once) -> ``run`` (load, the checks that need the model, ``pipeline.prune``, write everything at
once, print the summary).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..ir.analysis import conv_nodes
from ..ci_summary import markdown
from ..errors import ArgumentParser, UserError, run_reporting_errors
from ..checks.gate import BUDGET_NOT_MET, AccuracyCheck, BudgetNotMet, explicit_min_agreement, failed_path
from ..checks.gate import check_options as check_gate_options
from ..ir.model_io import check_paths, load_model, model_writer, text_writer, write_files
from ..ir.normalize import name_unnamed_nodes
from ..planning.agreement_budget import check_agreement
from ..pipeline import Progress, PruneConfig, prune
from ..planning.plan import Plan
from ..ir.shapes import DEFAULT_DIM, check_given, parse_input_shape
from . import SUBCOMMANDS
from .console import ConsoleProgress, nothing_pruned_warning, summary

DESCRIPTION = """\
Grouped kernel pruning (TMI-GKP, ICLR 2022) of a CNN in ONNX: every prunable Conv becomes
Gather(kept input channels) + Conv(group=G) with filters clustered into G equal groups, and the
output is checked against the original with the pruned kernels zeroed.

other commands:
""" + "\n".join(f"  onnxprune {name:<6} {text}" for name, (_, text) in SUBCOMMANDS.items())

EPILOG = """\
examples:
  onnxprune samples/resnet20.onnx /tmp/r20_pruned.onnx --report /tmp/report.json
  onnxprune model.onnx out.onnx --rate 0.5 --groups 4 --tickets snap_e10.onnx snap_e12.onnx
  onnxprune model.onnx out.onnx --plan-out plan.json     # inspect or edit the decisions
  onnxprune model2.onnx out2.onnx --plan-in plan.json    # re-apply them without re-planning
  onnxprune model.onnx out.onnx --calib c.npz --min-agreement 0.98 --eval-data test.npz
            --max-accuracy-drop 1 --check-speed --summary-md summary.md   # CI gates
exit status: 0 ok, 2 bad usage or unusable input, 1 the pass failed (e.g. verification),
3 a budget (--min-agreement, --max-accuracy-drop, --check-speed) not met: nothing written at OUT."""


def _groups_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def input_shape_arg(text: str):
    """argparse type of ``--input-shape`` (also ``onnxprune bench``'s)."""
    try:
        return parse_input_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _agreement_arg(text: str):
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        return check_agreement(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], 'auto' or 'off', got {text!r}") from None
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _coupled_rate(text: str):
    """--coupled-rate: 'auto', 'off' or a fraction (its range is checked with the other options)."""
    if text == "auto":
        return text
    if text == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), 'auto' or 'off', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="onnxprune", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN.onnx", help="model to prune (never modified)")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the pruned model (atomically)")
    p.add_argument("--rate", type=float, default=0.4375,
                   help="fraction of grouped kernels (input channels per group) to prune, in [0, 1) "
                        "(default 0.4375, the paper's setting)")
    p.add_argument("--groups", type=_groups_arg, default="auto",
                   help="groups G for every pruned Conv (the paper uses 8), or 'auto': G and kept channels "
                        "chosen per layer so the model runs faster on --provider, layers that cannot "
                        "get faster stay dense (default auto)")
    p.add_argument("--input-shape", type=input_shape_arg, action="append", metavar="NAME=1x3x640x640",
                   help="shape for an input with symbolic dimensions (repeat for several inputs), used for MACs, "
                        "planning, calibration and verification (the same input again: a further size to verify "
                        "at); the output keeps the symbolic dimensions "
                        f"(default: the --calib data's shape, else {DEFAULT_DIM} for each symbolic axis but the batch)")
    speed = p.add_argument_group("speed-aware planning (with --groups auto)")
    speed.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                       help="execution provider the model will run on (default cpu)")
    speed.add_argument("--target-macs", type=float, metavar="F",
                       help="keep this fraction of the model's MACs (e.g. 0.6); implies --groups auto")
    speed.add_argument("--target-speedup", type=float, metavar="S",
                       help="aim for this latency speedup over the input; implies --groups auto")
    speed.add_argument("--coupled-rate", type=_coupled_rate, metavar="auto|off|R", default="auto",
                       help="coupled channel groups (residual streams, Concat/Split, SE gates; provider-aligned; "
                            "channels ranked by weight norms, or by their use on the --calib data): 'auto' (default) "
                            "offers each group's cuts (3/4 and 1/2 of its width) to the fidelity planner beside the "
                            "single-Conv cuts, measured on --calib (output change with the dropped channels unread) "
                            "or ranked by the weight proxy (only where the fidelity planner plans: not with --groups "
                            "N, --plan-in, --tickets or --planner speed); 'off' never narrows them; R removes this "
                            "fraction of every group, then the rest is planned; the report's 'coupled' section lists "
                            "each group, what was offered and what was left alone")
    speed.add_argument("--latency-table", metavar="table.json",
                       help="per-layer latencies measured by 'onnxprune autotune' (default: analytical model)")
    speed.add_argument("--check-speed", action="store_true",
                       help="measure the pruned model against the input; a gate: slower fails with exit 3")
    fid = p.add_argument_group("fidelity-aware planning (with --groups auto)")
    fid.add_argument("--planner", choices=("fidelity", "speed"), default="fidelity",
                     help="'fidelity': measure on --calib data how much each candidate cut changes the output and "
                          "spend the MACs budget where it changes least (without --calib a weight-norm proxy: "
                          "fidelity unmeasured); 'speed': the same cut rate everywhere, fastest layout per layer "
                          "(default fidelity)")
    fid.add_argument("--min-agreement", type=_agreement_arg, default="auto", metavar="P",
                     help="fidelity budget: the deepest plan (not deeper than --rate/--target-macs) whose top-1 "
                          "agreement with the input model on held-out calibration inputs is at least P; 'off' "
                          "disables it (default: 0.97 with --calib and no --target-macs/--target-speedup, else off); "
                          "with --groups N, --plan-in or --planner speed an explicit P is only checked (CI gate)")
    gate = p.add_argument_group("CI gates (a budget not met: exit 3, no model written at OUT; an explicit "
                                "--min-agreement and --check-speed are gates too)")
    gate.add_argument("--eval-data", metavar="X.npz",
                      help="labelled images (.npz with 'images' and 'labels', as for 'onnxprune eval'): top-1 "
                           "accuracy of the input and the output is measured and reported")
    gate.add_argument("--max-accuracy-drop", type=float, metavar="PTS",
                      help="fail (exit 3) if top-1 accuracy on --eval-data drops by more than PTS percentage points")
    gate.add_argument("--keep-failed", action="store_true",
                      help="when a budget is not met, write the model as OUT.failed.onnx (and --plan-out) "
                           "instead of writing nothing")
    gate.add_argument("--summary-md", metavar="FILE",
                      help="write a one-screen markdown summary (sizes, verify, measurements, each gate "
                           "PASS/FAIL) for a CI log or job summary, also when a budget is not met")
    fid.add_argument("--distill", action="store_true",
                     help="after pruning and refit, fine-tune the kept weights (structure fixed) so the output "
                          "matches the input model's on the --calib images, with augmentation, on the CPU "
                          "(needs PyTorch: pip install 'onnxprune[distill]')")
    fid.add_argument("--distill-time", type=float, default=300.0, metavar="SECONDS",
                     help="training time for --distill (default 300); the step count it allowed is in the report")
    fid.add_argument("--distill-steps", type=int, metavar="N",
                     help="a fixed number of --distill steps instead of a time budget (byte-identical output)")
    calib = p.add_argument_group("calibration-data recovery")
    calib.add_argument("--calib", metavar="DATA",
                       help="unlabelled inputs (.npz with one array per input name or a single array, .npy, "
                            "or a folder of .npy) used to refit the kept kernels layer by layer")
    calib.add_argument("--calib-size", type=int, metavar="N", help="use at most N calibration samples")
    calib.add_argument("--calib-selection", choices=("data", "weights"), default="data",
                       help="kept grouped kernels with --calib: 'data' also tries a data-aware choice per group and "
                            "keeps the one that refits better; 'weights' keeps the paper's weight-only choice "
                            "(default data)")
    calib.add_argument("--calib-layers", choices=("all", "pruned"), default="all",
                       help="layers refit with --calib: 'all' also refits the dense layers after the first pruned one "
                            "(unpruned Convs, the Gemm head) so upstream error is corrected where it arrives; "
                            "'pruned' refits only the pruned Convs (default all)")
    calib.add_argument("--calib-target", choices=("residual", "output"), default="residual",
                       help="what a Conv feeding a residual Add is fit to: 'residual' makes the Add's output match "
                            "(it also cancels the error the skip path carries), 'output' only its own output "
                            "(default residual)")
    p.add_argument("--tickets", nargs="+", default=[], metavar="SNAP.onnx",
                   help="training snapshots (ONNX exports of the same model at earlier epochs) for the "
                        "tickets-magnitude-increase choice of clustering")
    p.add_argument("--criterion", choices=("tmi", "magnitude"), default="tmi",
                   help="how to choose among clusterings: tmi (needs --tickets; falls back to magnitude "
                        "without them) or magnitude (data-free) (default tmi)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE_NAME", help="Conv node names to leave dense")
    p.add_argument("--min-channels", type=int, default=16,
                   help="leave Convs with fewer input or output channels dense (default 16)")
    p.add_argument("--plan-out", metavar="plan.json", help="write the pruning plan (all decisions) as JSON")
    p.add_argument("--plan-in", metavar="plan.json", help="apply a saved plan instead of planning")
    p.add_argument("--report", metavar="report.json", help="write the JSON report (MACs, params, layers, verify)")
    p.add_argument("--seed", type=int, default=0, help="seed for clustering and verification inputs (default 0)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check against the masked original in ONNX Runtime (with --precision fp16: "
                        "converted without checking)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="float type of the output: 'fp16' converts the verified model to float16 (graph inputs "
                        "and outputs stay float32, overflow-prone ops such as Softmax/Exp/Reduce* stay float32), "
                        "checks it against the masked fp32 model with its weights rounded to fp16 at tolerance "
                        "1e-2 (what the weight rounding alone changes is reported) and reports top-1 agreement "
                        "on the --calib inputs in the report's 'precision' section (default fp32)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    noise.add_argument("-v", "--verbose", action="store_true", help="print one line per layer")
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    return p


@dataclass(frozen=True)
class PruneFiles:
    """The files a run reads and writes (paths as given; None: not asked for)."""

    input: str
    output: str
    tickets: tuple[str, ...] = ()
    calib: str | None = None
    plan_in: str | None = None
    latency_table: str | None = None
    eval_data: str | None = None
    report: str | None = None
    plan_out: str | None = None
    summary_md: str | None = None
    keep_failed: bool = False  # a model missing a budget goes to OUT.failed.onnx instead of nowhere

    def check(self) -> None:
        """Inputs exist, outputs are writable and differ from every input and from each other."""
        inputs = [("IN.onnx", self.input), *(("--tickets", t) for t in self.tickets), ("--calib", self.calib),
                  ("--plan-in", self.plan_in), ("--latency-table", self.latency_table),
                  ("--eval-data", self.eval_data)]
        outputs = [("OUT.onnx", self.output), ("--report", self.report), ("--plan-out", self.plan_out),
                   ("--summary-md", self.summary_md)]
        if self.keep_failed:
            outputs.append(("--keep-failed", failed_path(self.output)))
        check_paths(inputs, outputs, folders=("--calib",))


@dataclass(frozen=True)
class Console:
    """What goes to stderr: nothing but errors (and the warnings a CI log needs), or a line per layer."""

    quiet: bool = False
    verbose: bool = False


@dataclass
class PruneCommand:
    """One ``onnxprune IN.onnx OUT.onnx ...``: the files, the console options, ``--exclude`` as
    typed (checked against the model's Conv names once it is loaded) and the library's config
    (``config.plan`` is read from ``--plan-in`` by ``validate``)."""

    files: PruneFiles
    console: Console
    config: PruneConfig
    exclude: tuple[str, ...] = field(default=())

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PruneCommand":
        files = PruneFiles(input=args.input, output=args.output, tickets=tuple(args.tickets), calib=args.calib,
                           plan_in=args.plan_in, latency_table=args.latency_table, eval_data=args.eval_data,
                           report=args.report, plan_out=args.plan_out, summary_md=args.summary_md,
                           keep_failed=args.keep_failed)
        config = PruneConfig(rate=args.rate, groups=args.groups, input_shapes=args.input_shape,
                             criterion=args.criterion, seed=args.seed,
                             min_channels=args.min_channels, exclude=tuple(args.exclude), tickets=list(args.tickets),
                             plan=None, verify=not args.no_verify, provider=args.provider,
                             target_macs=args.target_macs, target_speedup=args.target_speedup,
                             coupled_rate=args.coupled_rate, latency_table=args.latency_table,
                             check_speed=args.check_speed,
                             calib=args.calib, calib_size=args.calib_size, calib_selection=args.calib_selection,
                             calib_layers=args.calib_layers, calib_target=args.calib_target,
                             planner=args.planner, min_agreement=args.min_agreement, distill=args.distill,
                             distill_time=args.distill_time, distill_steps=args.distill_steps,
                             eval_data=args.eval_data, max_accuracy_drop=args.max_accuracy_drop,
                             precision=args.precision)
        return cls(files, Console(args.quiet, args.verbose), config, tuple(args.exclude))

    def validate(self) -> None:
        """Every refusal that needs no model, in this order, before any work: the paths, the
        ``--plan-in`` file, the seed, the options (``PruneConfig.check``), the gates."""
        self.files.check()
        if self.files.plan_in:
            self.config.plan = _read_plan(self.files.plan_in)
        if not 0 <= self.config.seed < 2**32:
            raise UserError(f"--seed must be in 0..{2**32 - 1}, got {self.config.seed}")
        self.config.check()
        check_gate_options(self.config)
        if self.files.keep_failed and not (explicit_min_agreement(self.config) is not None
                                           or self.config.max_accuracy_drop is not None or self.config.check_speed):
            raise UserError("--keep-failed needs a gate: --min-agreement P, --max-accuracy-drop PTS or --check-speed")


def main(argv: list[str] | None = None) -> int:
    """``onnxprune IN.onnx OUT.onnx [options]`` -> the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_reporting_errors("onnxprune", _run, build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    command = PruneCommand.from_args(args)
    command.validate()
    return run(command)


def _read_plan(path: str) -> Plan:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--plan-in {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return Plan.from_json(text)
    except UserError as exc:
        raise UserError(f"--plan-in {path}: {exc}") from None


def _check_exclude(model, exclude) -> None:
    """Every ``--exclude`` name must be a Conv of ``model`` (named as plans and reports name them)."""
    name_unnamed_nodes(model.graph)
    convs = [node.name for node in conv_nodes(model.graph)]
    unknown = [name for name in exclude if name not in set(convs)]
    if unknown:
        close = {c for name in unknown for c in difflib.get_close_matches(name, convs, n=3)}
        shown = [c for c in convs if c in close] or convs[:5]
        more = ", ..." if len(convs) > len(shown) else ""
        raise UserError(f"--exclude: no Conv node named {', '.join(map(repr, unknown))}; Conv nodes: "
                        f"{', '.join(shown) or 'none'}{more}")


def run(command: PruneCommand) -> int:
    """A validated command: load, the checks that need the model, prune, write, report."""
    files, config = command.files, command.config
    model = load_model(files.input)
    _check_exclude(model, command.exclude)
    check_given(model, config.input_shapes)  # before the first progress line
    if files.eval_data:  # read, and the input model run on it, before the first progress line too
        config.eval_data = AccuracyCheck.prepare(model, files.eval_data)
    progress = Progress() if command.console.quiet else ConsoleProgress(command.console.verbose)
    failed = None
    try:
        model, report = prune(model, config, progress)
    except BudgetNotMet as exc:  # the model misses a budget: it goes nowhere the next CI step reads
        model, report, failed = exc.model, exc.report, exc
    written = files.output if failed is None else failed_path(files.output) if files.keep_failed else None
    outputs = {written: model_writer(model, written)} if written else {}
    if files.plan_out and written:
        outputs[files.plan_out] = text_writer(report.plan.to_json())
    if files.report:
        outputs[files.report] = text_writer(report.to_json())
    if files.summary_md:
        outputs[files.summary_md] = text_writer(markdown(report.data, files.input, files.output, written))
    write_files(outputs)
    if not command.console.quiet:
        print(summary(report.data, written), file=sys.stderr)
    warning = nothing_pruned_warning(report.data)
    if warning:  # printed even with -q: the output is the input, which is rarely what was meant
        print(f"onnxprune: warning: {warning}", file=sys.stderr)
    if failed is not None:  # printed even with -q: the line a CI log shows
        where = f"the model was written to {written}" if written else f"nothing written at {files.output}"
        print(f"onnxprune: {failed} ({where})", file=sys.stderr)
        return BUDGET_NOT_MET
    return 0
