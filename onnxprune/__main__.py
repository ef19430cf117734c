"""``python -m onnxprune``: the same command line as the ``onnxprune`` console script."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (pydoc, doctest collection) must not run the CLI
    sys.exit(main())
