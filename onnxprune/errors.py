"""The error classes and the exit-code contract every onnxprune command shares.

Why three classes: the person reading the message must know whose move it is.
- ``UserError``: the input or an option is unusable (missing file, bad option, a model we cannot
  process) — one line saying what to change, exit 2;
- ``PassFailed``: the pass ran but its result fails a check the user relies on (verification
  against the masked original; ``bench.check_speed`` called from Python — in the CLI
  ``--check-speed`` is a CI gate, exit 3) — one line, exit 1;
- anything else, ``InternalError`` included (an invariant of our own broken): a bug — the
  traceback, then one line asking for a report, exit 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from concurrent.futures.process import BrokenProcessPool

MAX_MESSAGE = 1000  # characters of an error line; longer ones are cut with "..."


class UserError(Exception):
    """An input or option that cannot be processed; the message says what to do."""


class PassFailed(RuntimeError):
    """The pass ran, but its result fails a check (verification; ``bench.check_speed(fail=True)``)."""


class InternalError(RuntimeError):
    """An invariant of onnxprune's own is broken: a bug, shown with its traceback."""


def one_line(text: object) -> str:
    """``text`` on one line: its lines joined by spaces (library errors such as onnx.checker's or
    ONNX Runtime's span several), cut at ``MAX_MESSAGE`` characters."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``prog: error: ... (see --help)``, exit 2) instead
    of the full usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def run_reporting_errors(prog: str, run, args) -> int:
    """``run(args)`` with the exit-code contract every onnxprune command shares.

    UserError -> its message on one line, exit 2; PassFailed (e.g. verification) -> one line,
    exit 1; Ctrl-C -> one line, exit 130; any other exception (a bug) -> its
    traceback and a line asking for a report, exit 1. Outputs are written all at once and
    atomically, so none of these leaves a partial file. (A budget not met, ``gate.BudgetNotMet``,
    is caught by the pruning command itself: exit 3.)
    """
    try:
        return run(args)
    except UserError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except PassFailed as exc:
        print(f"{prog}: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
    except (MemoryError, BrokenProcessPool) as exc:  # the machine, not a bug: a planner worker killed too
        print(f"{prog}: failed: out of memory ({type(exc).__name__}: {one_line(exc) or 'no details'}); nothing "
              f"written — free memory or try a smaller model or --calib-size", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: keep the traceback for the report
        traceback.print_exc()
        print(f"{prog}: internal error: {one_line(exc)} (a bug in onnxprune: please report it with the traceback "
              f"above and, if you can, the model)", file=sys.stderr)
        return 1
