"""The ``onnxprune`` commands: argument parsing, path checks and console output around the library.

Why apart from the library: a command turns ``argv`` into a config (dataclasses, checked once,
before any work), calls the library, and writes files and lines for a person or a CI log; the
library (``onnxprune.pipeline``, ``evaluate``, ``bench``, ``autotune``) takes those configs or
plain arguments from Python, never reads ``argv``, prints nothing and never imports this package.
What only a command knows lives here too, e.g. where ``onnxprune eval`` finds its default data.

One module per command: ``prune`` (the default: ``onnxprune IN.onnx OUT.onnx``), ``eval``,
``bench``, ``autotune``. ``main`` dispatches on the first argument; ``onnxprune.cli:main`` (the
console script, ``python -m onnxprune.cli``) is this ``main``. Every command shares the exit-code
contract of ``errors.run_reporting_errors``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one line for the default command's --help); the default command is "prune"
SUBCOMMANDS = {
    "eval": ("onnxprune.commands.eval", "top-1 accuracy / fidelity of an ONNX classifier on a data set"),
    "bench": ("onnxprune.commands.bench", "interleaved latency comparison of models in ONNX Runtime"),
    "autotune": ("onnxprune.commands.autotune", "measure per-layer latencies of candidate configurations"),
}
DEFAULT_COMMAND = "onnxprune.commands.prune"


def main(argv: list[str] | None = None) -> int:
    """``onnxprune [eval|bench|autotune] ...`` -> the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    return importlib.import_module(DEFAULT_COMMAND).main(argv)
