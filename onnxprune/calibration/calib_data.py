"""Load unlabelled calibration inputs for ``--calib`` and fit them to the model's inputs.

Accepted sources (axis 0 is always the sample axis):
- ``.npz``: one array per model input name; or, for a single-input model, a single array, or an
  ``images`` array (data-set files often store ``labels`` next to it; labels are ignored);
- ``.npy``: one array, for a single-input model;
- a folder of ``.npy`` files: either one file per input name (``<input>.npy``), or, for a
  single-input model, any number of files (sorted by name) each holding one sample or a batch;
- in Python, ``{input name: array}``.

Conversions, done so that raw data sets work as they are stored:
- ``uint8`` data for a float input is taken as 8-bit pixels: ``float32 / 255`` (values in
  [0, 1], what the Fashion-MNIST samples expect); other float data is cast to the input dtype;
  any other dtype (ints, bools, strings) for a float input is an error, since the scale is unknown;
- data one rank short of the input whose missing axis is a size-1 channel axis (``N x H x W``
  for an ``N x 1 x H x W`` input) gets that axis added.

Everything else that does not fit (wrong shape, wrong dtype, missing input name, no samples,
non-finite values, an unreadable file) raises ``UserError`` with what is wrong: the CLI turns
it into one line and exit status 2.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx

from ..errors import UserError
from ..ir.shapes import model_inputs as shape_inputs


def model_inputs(model: onnx.ModelProto) -> list[tuple[str, np.dtype, list]]:
    """(name, dtype, dims) of the real graph inputs (``shapes.model_inputs`` with the element type);
    dims hold ints or None for symbolic axes."""
    elem_types = {inp.name: inp.type.tensor_type.elem_type for inp in model.graph.input}
    return [(name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_types[name])), dims)
            for name, dims in shape_inputs(model)]


def load_calibration_inputs(source, model: onnx.ModelProto, limit: int | None = None,
                            notes: list | None = None) -> dict[str, np.ndarray]:
    """Calibration feeds ``{input name: array}`` for ``model``, the first ``limit`` samples.

    ``notes`` (optional list) receives one human-readable line per conversion applied.
    """
    if limit is not None and limit < 1:
        raise UserError(f"--calib-size must be >= 1, got {limit}")
    inputs = model_inputs(model)
    if not inputs:
        raise UserError("the model has no inputs to calibrate")
    raw = _read_source(source, [name for name, _, _ in inputs])
    feeds, counts = {}, set()
    for name, dtype, dims in inputs:
        value = _conform(raw[name], name, dtype, dims, notes)
        feeds[name] = value
        counts.add(len(value))
    if len(counts) != 1:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in feeds.items())
        raise UserError(f"calibration inputs have different numbers of samples ({sizes})")
    count = counts.pop()
    if count == 0:
        raise UserError("calibration data holds no samples")
    if limit is not None and limit < count:
        feeds = {k: v[:limit] for k, v in feeds.items()}
    return feeds


# -- reading ------------------------------------------------------------------------------

def _read_source(source, names: list[str]) -> dict[str, np.ndarray]:
    """Raw arrays per input name, before dtype/shape conversion."""
    if isinstance(source, dict):
        return _pick(dict(source), names, "the given calibration dict")
    path = Path(os.fspath(source))
    label = f"--calib {path}"
    if path.is_dir():
        return _read_folder(path, names, label)
    if not path.is_file():
        raise UserError(f"{label}: no such file or folder")
    if path.stat().st_size == 0:
        raise UserError(f"{label}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"{label}: not a readable .npz file ({_first_line(exc)})") from None
        if not arrays:
            raise UserError(f"{label}: the .npz file holds no arrays")
        return _pick(arrays, names, label)
    if suffix == ".npy":
        return _pick({path.stem: _load_npy(path, label)}, names, label, single_file=True)
    raise UserError(f"{label}: unsupported calibration format {suffix or '(no extension)'!r}; "
                    f"use .npz, .npy or a folder of .npy files")


def _read_folder(path: Path, names: list[str], label: str) -> dict[str, np.ndarray]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not files:
        raise UserError(f"{label}: the folder holds no .npy files")
    by_stem = {p.stem: p for p in files}
    if all(name in by_stem for name in names):
        return {name: _load_npy(by_stem[name], label) for name in names}
    if len(names) > 1:
        missing = [n for n in names if n not in by_stem]
        raise UserError(f"{label}: no file for model input(s) {', '.join(map(repr, missing))} "
                        f"(expected <input name>.npy per input)")
    arrays = [_load_npy(p, label) for p in files]
    ranks = {a.ndim for a in arrays}
    if len(ranks) != 1:
        raise UserError(f"{label}: the .npy files have different ranks {sorted(ranks)}; "
                        f"use one sample or one batch per file, consistently")
    # Equal full shapes: one sample per file or equal batches (decided against the input rank).
    if len({a.shape for a in arrays}) == 1 and len(arrays) > 1:
        return {names[0]: _SamplesOrBatch(np.stack(arrays), np.concatenate(arrays))}
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise UserError(f"{label}: the .npy batches have different sample shapes {sorted(shapes)}")
    return {names[0]: np.concatenate(arrays)}


class _SamplesOrBatch:
    """Folder of equal-shape files: each file is one sample (stacked) or a batch (concatenated).

    Which one is decided against the model input's rank in ``_conform``.
    """

    def __init__(self, stacked: np.ndarray, concatenated: np.ndarray):
        self.stacked, self.concatenated = stacked, concatenated


def _load_npy(path: Path, label: str) -> np.ndarray:
    if path.stat().st_size == 0:
        raise UserError(f"{label}: {path.name} is empty")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{label}: {path.name} is not a readable .npy file ({_first_line(exc)})") from None


def _pick(arrays: dict, names: list[str], label: str, single_file: bool = False) -> dict[str, np.ndarray]:
    """Match arrays to input names: by name, else the only array / ``images`` for one input."""
    if all(name in arrays for name in names):
        return {name: arrays[name] for name in names}
    if len(names) == 1 and not single_file and "images" in arrays:
        return {names[0]: arrays["images"]}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    raise UserError(f"{label}: no calibration array for model input(s) {', '.join(map(repr, missing))} "
                    f"(found {', '.join(map(repr, sorted(arrays))) or 'none'})")


# -- conversion -----------------------------------------------------------------------------

def _conform(value, name: str, dtype: np.dtype, dims: list, notes) -> np.ndarray:
    """Cast and reshape one input's data to the model's dtype and rank; check fixed dims."""
    if isinstance(value, _SamplesOrBatch):
        try:  # files as single samples first, then as batches
            return _conform(value.stacked, name, dtype, dims, notes)
        except UserError:
            return _conform(value.concatenated, name, dtype, dims, notes)
    rank = len(dims)
    value = np.asarray(value)
    value = _convert_dtype(value, name, dtype, notes)
    if value.ndim == rank - 1 and rank >= 2 and dims[1] == 1:
        value = value[:, None]
        _note(notes, f"input {name!r}: added the size-1 channel axis ({value.shape[1:]} per sample)")
    expected = "x".join("N" if i == 0 else str(d) if d else "?" for i, d in enumerate(dims))
    if value.ndim != rank or any(d is not None and d != got for d, got in zip(dims[1:], value.shape[1:])):
        raise UserError(f"calibration data for input {name!r} has shape {tuple(value.shape)}, "
                        f"but the model expects {expected} (axis 0 = samples)")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise UserError(f"calibration data for input {name!r} contains NaN or infinite values")
    return np.ascontiguousarray(value)


def _convert_dtype(value: np.ndarray, name: str, dtype: np.dtype, notes) -> np.ndarray:
    if dtype.kind == "f":
        if value.dtype == np.uint8:
            _note(notes, f"input {name!r}: uint8 pixels converted to {dtype} / 255 (values in [0, 1])")
            return value.astype(dtype) / dtype.type(255)
        if value.dtype.kind == "f":
            return value.astype(dtype, copy=False)
    elif dtype.kind in "iu" and value.dtype.kind in "iu":
        return value.astype(dtype, copy=False)
    elif dtype.kind == "b" and value.dtype.kind == "b":
        return value
    raise UserError(f"calibration data for input {name!r} has dtype {value.dtype}, but the model input is "
                    f"{dtype} (accepted: float data, or uint8 pixels for float inputs, converted /255)")


def _note(notes, line: str) -> None:
    if notes is not None and line not in notes:
        notes.append(line)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
