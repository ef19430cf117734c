"""The ``onnxprune`` console script (``onnxprune.cli:main``), ``python -m onnxprune`` and ``-m onnxprune.cli``.

The commands themselves live in ``onnxprune.commands`` (one module each); this module stays the
entry point scripts, benchmarks and packaging name. ``build_parser`` is the default command's
(``onnxprune IN.onnx OUT.onnx``) parser.
"""

from __future__ import annotations

import sys

from .commands import main
from .commands.prune import build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
