"""Error types that the CLI turns into a one-line message and exit code 2.

Why a dedicated type: anything raised as ``UserError`` is the user's input being unusable
(missing file, bad option, a model we cannot process). The CLI prints it without a traceback;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input or option that cannot be processed; the message says what to do."""


def run_reporting_errors(prog: str, run, args) -> int:
    """``run(args)`` with the exit-code contract every onnxprune command shares.

    UserError -> its message on one line, exit 2; RuntimeError (the pass itself failed, e.g.
    verification or a speed check) -> one line, exit 1; Ctrl-C -> exit 130. Outputs are written
    atomically, so none of these leaves a partial file.
    """
    import sys

    try:
        return run(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
