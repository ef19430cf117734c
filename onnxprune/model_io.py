"""Loading and saving models: the only place that touches model files.

Rules:
- A model that cannot be read or is not a well-formed ONNX CNN graph raises ``UserError`` with
  what is wrong, never a protobuf traceback.
- External data is loaded into memory, so the caller works on one self-contained proto.
- Outputs are written atomically (temporary file in the destination folder, then rename), so a
  failed run never leaves a half-written OUT and never touches IN.
- ONNX Runtime accepts IR version ≤ 13; newer onnx writes 14 by default, so models are capped at
  ``MAX_IR_VERSION`` when saved.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import UserError

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
            raise UserError(f"{path}: cannot load model or its external data: {exc}") from None
    if not model.graph.node or not model.opset_import:
        raise UserError(f"{label}: not an ONNX model (empty graph or no opset)")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: invalid ONNX model: {first}") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    raise UserError("model imports no default ONNX opset")


def cap_ir_version(model: onnx.ModelProto) -> None:
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def _write_atomically(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A failure (or Ctrl-C) removes the temporary file, so ``path`` is either untouched or complete.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically; models over 2 GiB get an external data file."""
    cap_ir_version(model)
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

    _write_atomically(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _write_atomically(path, write)
