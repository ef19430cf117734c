"""The one place that opens an ONNX Runtime session.

Why one place: calibration, sensitivity probes, verification, evaluation, distillation and the
latency benchmark all run models, and each used to build its own ``SessionOptions``: two of four
left ORT's thread spinning on (idle pool threads busy-wait and steal the cores of whatever runs
next, which on a 2-core machine slowed everything that followed), and each worded an unloadable
model differently. Rules:

- thread spinning is off: onnxprune runs several sessions in turn in one process;
- log severity 4 (fatal only): ORT's warnings about the model are not the user's business, and
  an error it logs (a kernel that failed in a run) also comes back as the exception the caller
  words as one line, so logging it too would put ORT's coloured log line above that line;
- a model ORT cannot load becomes a one-line ``UserError`` worded by the caller
  (``load_error``, with ``{reason}`` the first line of ORT's message), or — for models onnxprune
  built itself, where failing to load is a bug — ORT's exception as it is (``load_error=None``).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import UserError

CPU = ("CPUExecutionProvider",)


def create_session(model, *, providers=CPU, threads: int | None = None, inter_threads: int | None = None,
                   optimize: bool = True, sequential: bool = False,
                   load_error: str | None = "ONNX Runtime cannot load the model: {reason}") -> ort.InferenceSession:
    """An ``InferenceSession`` for ``model`` (ModelProto, serialized bytes or a path).

    ``threads``/``inter_threads``: intra-/inter-op thread counts (None: ORT's default);
    ``optimize=False`` disables graph optimizations (default: ORT's, all of them); ``sequential``
    selects ORT_SEQUENTIAL execution (the benchmark's fixed settings).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
    if inter_threads is not None:
        options.inter_op_num_threads = inter_threads
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # ORT raises several unrelated types for unloadable models
        if load_error is None:
            raise
        raise UserError(load_error.format(reason=ort_reason(exc))) from None


def ort_reason(exc: BaseException) -> str:
    """The first line of an ORT exception (the rest is its C++ context), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ort_load_failure(model: onnx.ModelProto, timeout_s: float = 300.0) -> str | None:
    """None if ONNX Runtime (CPU provider, default optimizations) loads ``model`` in a child
    process, or if no child can be started or import ONNX Runtime (nothing to learn); else what
    happened: ``"signal 11 (SIGSEGV)"``, ``"exit 1: <ORT's reason>"``, a timeout. Why a child: a
    model that crashes ONNX Runtime's optimizer takes the whole process down (exit 139, no
    message), and a written model that crashes every user's session is worse."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    code = ("import sys\n"
            "try:\n import onnxruntime as ort\nexcept ImportError:\n sys.exit(3)\n"
            "o = ort.SessionOptions(); o.log_severity_level = 4\n"  # the session rules, as create_session's
            "ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        try:
            done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, timeout=timeout_s,
                                  env=env, text=True)
        except subprocess.TimeoutExpired:
            return f"no answer in {timeout_s:g} s"
        except OSError:
            return None
    if done.returncode in (0, 3):
        return None
    if done.returncode < 0:
        try:
            return f"signal {-done.returncode} ({signal.Signals(-done.returncode).name})"
        except ValueError:
            return f"signal {-done.returncode}"
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"exit {done.returncode}" + (f": {lines[-1].strip()}" if lines else "")
