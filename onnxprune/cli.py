"""Command line: ``onnxprune IN.onnx OUT.onnx [options]`` and ``onnxprune eval ...``.

Exit codes: 0 success; 2 bad usage or an input that cannot be processed (one line on stderr,
no traceback, no OUT written); 1 when the pass itself fails (e.g. verification).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError, run_reporting_errors
from .model_io import save_model, write_text_atomic
from .pipeline import Progress, PruneConfig, prune
from .plan import Plan

SUBCOMMANDS = {
    "eval": ("onnxprune.evaluate", "top-1 accuracy / fidelity of an ONNX classifier on a data set"),
    "bench": ("onnxprune.bench", "interleaved latency comparison of models in ONNX Runtime"),
    "autotune": ("onnxprune.autotune", "measure per-layer latencies of candidate configurations"),
}

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
exit status: 0 ok, 2 bad usage or unusable input, 1 the pass failed (e.g. verification)."""


def _groups_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnxprune", description=DESCRIPTION, epilog=EPILOG,
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
    speed = p.add_argument_group("speed-aware planning (with --groups auto)")
    speed.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                       help="execution provider the model will run on (default cpu)")
    speed.add_argument("--target-macs", type=float, metavar="F",
                       help="keep this fraction of the model's MACs (e.g. 0.6); implies --groups auto")
    speed.add_argument("--target-speedup", type=float, metavar="S",
                       help="aim for this latency speedup over the input; implies --groups auto")
    speed.add_argument("--latency-table", metavar="table.json",
                       help="per-layer latencies measured by 'onnxprune autotune' (default: analytical model)")
    speed.add_argument("--check-speed", action="store_true",
                       help="measure the pruned model against the input and fail if it is slower")
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
                   help="skip the check against the masked original in ONNX Runtime")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    noise.add_argument("-v", "--verbose", action="store_true", help="print one line per layer")
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    return p


class ConsoleProgress(Progress):
    """Stage lines and a per-layer bar on stderr (a line per layer with -v or without a tty)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.tty = sys.stderr.isatty()

    def stage(self, message: str) -> None:
        print(f"onnxprune: {message}", file=sys.stderr, flush=True)

    def layer(self, done: int, total: int, name: str) -> None:
        if self.tty and not self.verbose:
            width = 30
            filled = width * done // max(total, 1)
            end = "\n" if done == total else ""
            print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[:40]:<40}",
                  end=end, file=sys.stderr, flush=True)
        elif done < total and (self.verbose or done % max(1, total // 10) == 0):
            print(f"  [{done + 1}/{total}] {name}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = __import__(SUBCOMMANDS[argv[0]][0], fromlist=["main"])
        return module.main(argv[1:])
    return run_reporting_errors("onnxprune", _run, build_parser().parse_args(argv))


def _check_paths(args) -> None:
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    if src.resolve() == dst.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        raise UserError("OUT.onnx must differ from IN.onnx (the input is never overwritten)")
    for path in [dst] + [Path(p) for p in (args.report, args.plan_out) if p]:
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"{path}: output folder {folder} does not exist")
    for ticket in args.tickets:
        if not Path(ticket).is_file():
            raise UserError(f"--tickets {ticket}: no such file")
    if args.plan_in and not Path(args.plan_in).is_file():
        raise UserError(f"--plan-in {args.plan_in}: no such file")


def _run(args) -> int:
    _check_paths(args)
    plan = Plan.from_json(Path(args.plan_in).read_text()) if args.plan_in else None
    if args.calib and not Path(args.calib).exists():
        raise UserError(f"--calib {args.calib}: no such file or folder")
    config = PruneConfig(rate=args.rate, groups=args.groups, criterion=args.criterion, seed=args.seed,
                         min_channels=args.min_channels, exclude=tuple(args.exclude), tickets=list(args.tickets),
                         plan=plan, verify=not args.no_verify, provider=args.provider,
                         target_macs=args.target_macs, target_speedup=args.target_speedup,
                         latency_table=args.latency_table, check_speed=args.check_speed,
                         calib=args.calib, calib_size=args.calib_size, calib_selection=args.calib_selection,
                         calib_layers=args.calib_layers, calib_target=args.calib_target)
    config.check()
    progress = Progress() if args.quiet else ConsoleProgress(args.verbose)
    model, report = prune(args.input, config, progress)
    save_model(model, args.output)
    if args.plan_out:
        write_text_atomic(args.plan_out, report.plan.to_json())
    if args.report:
        write_text_atomic(args.report, report.to_json())
    if not args.quiet:
        print(summary(report.data, args.output), file=sys.stderr)
    return 0


def summary(report: dict, output: str) -> str:
    mb, ma = report["macs_before"], report["macs_after"]
    pb, pa = report["pruned_layers_macs_before"], report["pruned_layers_macs_after"]
    lines = [f"onnxprune: pruned {report['convs_pruned']} Convs, left {report['convs_skipped']} dense",
             f"  MACs   {mb / 1e6:10.2f}M -> {ma / 1e6:10.2f}M  ({_cut(mb, ma)} whole model, "
             f"{_cut(pb, pa)} of the pruned layers)",
             f"  params {report['params_before'] / 1e6:10.3f}M -> {report['params_after'] / 1e6:10.3f}M  "
             f"({_cut(report['params_before'], report['params_after'])})"]
    calib = report.get("calibration")
    if calib and calib.get("fidelity"):
        fid = calib["fidelity"]
        lines.append(f"  calibrated on {calib['fit_samples']} inputs: top-1 agreement with the original on "
                     f"{fid['samples']} held-out inputs {100 * fid['uncalibrated']['top1_agreement']:.1f}% -> "
                     f"{100 * fid['calibrated']['top1_agreement']:.1f}%")
    if report["verify"]:
        v = report["verify"]
        lines.append(f"  verify: max relative diff {v['max_rel_diff']:.2e} vs masked original (tolerance {v['tolerance']:g})")
    lines.append(f"  wrote {output}")
    return "\n".join(lines)


def _cut(before: int, after: int) -> str:
    return f"-{100 * (1 - after / before):.1f}%" if before else "n/a"


if __name__ == "__main__":
    sys.exit(main())
