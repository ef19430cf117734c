"""``python -m onnxprune``: the same command line as the ``onnxprune`` console script."""

import sys

from .cli import main

sys.exit(main())
