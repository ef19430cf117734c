"""Error types that the CLI turns into a one-line message and exit code 2.

Why a dedicated type: anything raised as ``UserError`` is the user's input being unusable
(missing file, bad option, a model we cannot process). The CLI prints it without a traceback;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

MAX_MESSAGE = 1000  # characters of an error line; longer ones are cut with "..."


class UserError(Exception):
    """An input or option that cannot be processed; the message says what to do."""


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

    UserError -> its message on one line, exit 2; RuntimeError (the pass itself failed, e.g.
    verification or a speed check) -> one line, exit 1; Ctrl-C -> one line, exit 130. Outputs
    are written all at once and atomically, so none of these leaves a partial file. (A budget not
    met, ``gate.BudgetNotMet``, is caught by the pruning command itself: exit 3.)
    """
    try:
        return run(args)
    except UserError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{prog}: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
