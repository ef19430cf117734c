"""Loading and saving models: the only place that touches model files.

Rules:
- A model that cannot be read or is not a well-formed ONNX CNN graph raises ``UserError`` with
  what is wrong, never a protobuf traceback.
- External data is loaded into memory, so the caller works on one self-contained proto.
- Outputs are written atomically and all at once (temporary files in the destination folders,
  renamed when all are written), so a failed run never leaves a half-written or partial output.
- ONNX Runtime accepts IR version ≤ 13; newer onnx writes 14 by default, so models are capped at
  ``MAX_IR_VERSION`` when saved.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import UserError, one_line

MAX_IR_VERSION = 13
_TWO_GIB = 2**31 - 1


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Return a checked, self-contained copy of ``source`` (a path or a ModelProto)."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "the given model"
    else:
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise UserError(f"{path}: no such file")
        if not path.is_file():
            raise UserError(f"{path}: not a file")
        try:
            model = onnx.load(str(path), load_external_data=True)
        except DecodeError as exc:
            raise UserError(f"{path}: not a readable ONNX model (truncated or not ONNX: {exc})") from None
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise UserError(f"{path}: cannot load model or its external data: {one_line(exc)}") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{label}: not an ONNX model (empty graph or no opset)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise UserError(f"{label}: invalid ONNX model: {one_line(exc) or type(exc).__name__}") from None
    name_negative_dims(model.graph)
    return model


def name_negative_dims(graph: onnx.GraphProto) -> int:
    """Turn each negative ``dim_value`` of a declared tensor type (inputs, outputs, value_info,
    in subgraphs too) into a symbolic ``dim_param`` (``<tensor>_dim<axis>``); returns how many.

    Why: PaddlePaddle's exporter writes -1 for a dynamic size. ONNX allows only sizes >= 0, and
    ONNX Runtime runs such a model, but shape inference on it fails ("Invalid Target shape
    product of 0"), so the rewritten model failed the full checker after the whole pass
    ("internal error"). Read as what it means, a named dynamic size, the model prunes, and the
    output declares it so (a valid model)."""
    from .graph import all_graphs

    renamed = 0
    for each in all_graphs(graph):
        for info in (*each.input, *each.output, *each.value_info):
            if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            for axis, dim in enumerate(info.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.dim_param = f"{info.name}_dim{axis}"
                    renamed += 1
    return renamed


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise UserError("model imports no default ONNX opset")


def cap_ir_version(model: onnx.ModelProto) -> None:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def refuse_empty(paths) -> None:
    """An empty or blank path among ``(label, path)`` pairs (None: not given, skipped) is a
    one-line refusal, not "not given". Paths as given (str): ``Path("")`` would already read "."."""
    for label, path in paths:
        if path is not None and not str(path).strip():
            raise UserError(f"{label} is empty{' or blank' if path else ''}: give a file name")


def check_paths(inputs, outputs, folders=()) -> None:
    """Refuse, before any work, what would fail or lose a file: ``inputs`` and ``outputs`` are
    ``(label, path)`` pairs, label an option (``--report``) or a positional name (``IN.onnx``); a
    None path is skipped, and inputs whose label is in ``folders`` may be folders.

    Inputs must exist; outputs must go to an existing, writable folder, not be a folder, and
    differ from every input and from each other, compared through symlinks and hard links, so
    nothing read is ever written. An empty path is refused, not read as "not given": in a script,
    ``onnxprune in.onnx "$OUT"`` with ``OUT`` unset must not run the whole pass and write nothing.
    """
    inputs = [(label, path) for label, path in inputs if path is not None]
    outputs = [(label, path) for label, path in outputs if path is not None]
    refuse_empty(inputs + outputs)
    for label, path in inputs:
        named = f"{label} {path}" if label.startswith("-") else path
        if not os.path.exists(path):
            raise UserError(f"{named}: no such file{' or folder' if label in folders else ''}")
        if label not in folders and not os.path.isfile(path):
            raise UserError(f"{named}: not a file")
    for i, (label, path) in enumerate(outputs):
        for other_label, other in inputs + outputs[:i]:
            if _same_file(path, other):
                why = " (an input is never overwritten)" if (other_label, other) in inputs else ""
                raise UserError(f"{label} must differ from {other_label}: both are {other}{why}")
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise UserError(f"{path}: output folder {folder} does not exist")
        if os.path.isdir(path):
            raise UserError(f"{label} {path} is a folder, not a file name")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{path}: output folder {folder} is not writable")


def _same_file(a, b) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def write_files(files: dict) -> None:
    """Write several outputs all or nothing: ``files`` maps each path to ``write(tmp_path)``.

    Each output is written to a temporary file beside it; only when all are written are they
    renamed into place. A failure (or Ctrl-C) removes the temporary files, so every ``path`` is
    either untouched or complete. An OS error (read-only folder, disk full, a folder in the way)
    becomes a one-line ``UserError`` naming the path. Files get the usual mode (0666 less the
    umask), not mkstemp's 0600.
    """
    mode = 0o666 & ~_umask()
    staged = []  # (temporary file, final path)
    path = None
    try:
        for path, write in files.items():
            path = Path(path)
            folder = path.parent if str(path.parent) else Path(".")
            if not folder.is_dir():
                raise UserError(f"cannot write {path}: folder {folder} does not exist")
            if path.is_dir():
                raise UserError(f"cannot write {path}: it is a folder")
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            staged.append((tmp, path))
            os.chmod(tmp, mode)
            write(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def model_writer(model: onnx.ModelProto, path: str | os.PathLike):
    """``write(tmp_path)`` for ``write_files``: the model (IR version capped, on a copy: the
    caller's model is theirs); over 2 GiB its tensors go to ``<name>.data`` beside ``path``."""
    if model.ir_version > MAX_IR_VERSION:
        capped = onnx.ModelProto()
        capped.CopyFrom(model)
        cap_ir_version(capped)
        model = capped
    name = Path(path).name

    def write(tmp: str) -> None:
        if model.ByteSize() > _TWO_GIB:
            # The data file is written under its final name (the model refers to it by name);
            # the model file itself still appears atomically.
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=name + ".data")
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))

    return write


def text_writer(text: str):
    """``write(tmp_path)`` for ``write_files``: ``text`` as UTF-8."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically; models over 2 GiB get an external data file."""
    write_files({path: model_writer(model, path)})


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_files({path: text_writer(text)})
