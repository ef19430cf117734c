"""The concrete input shapes every stage works at, for models with symbolic dimensions.

Why one place: MACs, the planners' cost model, calibration and verification all need static
shapes, and detectors and OCR models declare a symbolic height and width (N×3×H×W). Each stage
once guessed on its own (MACs set every symbolic dim to 1, verification refused them); now
``resolve_input_shapes`` decides once and the pipeline works on ``with_input_shapes(model)``,
while the output gets the input model's symbolic dims back (``restore_input_dims``).

Rules, per real graph input (one without an initializer), per axis:
- a fixed dimension of the model is kept (a different ``--input-shape`` value is an error);
- a symbolic axis 0 is the batch and stays symbolic: MACs are counted at batch 1, calibration
  runs its samples, verification 2 random inputs (``--input-shape`` may give any batch there);
- any other symbolic axis takes, in this order, the ``--input-shape`` value, the calibration
  data's size on that axis, or ``DEFAULT_DIM``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import UserError

# 224: the common classifier size, and a multiple of 32, so a backbone with five stride-2 stages
# (detectors, OCR) divides evenly and every feature map is at least 7 wide.
DEFAULT_DIM = 224
SOURCES = ("model", "--input-shape", "calibration data", "default")


@dataclass(frozen=True)
class InputShape:
    """One input's working dims (None: the symbolic batch axis) and where they came from."""

    name: str
    dims: tuple[int | None, ...]
    source: str  # one of SOURCES: who fixed the symbolic non-batch axes ("model": there were none)

    def text(self) -> str:
        return "x".join("N" if d is None else str(d) for d in self.dims)


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``NAME=1x3x640x640`` (or ``1x3x640x640`` for a single-input model) -> (name, dims)."""
    name, sep, dims_text = text.rpartition("=")
    if not sep:
        name = None
    elif not name:
        raise ValueError(f"expected NAME=DIMS such as images=1x3x640x640, got {text!r}")
    if not re.fullmatch(r"\s*-?\d+(\s*[x,]\s*-?\d+)*\s*", dims_text):
        raise ValueError(f"expected dimensions separated by 'x' such as 1x3x640x640, got {dims_text!r}")
    dims = tuple(int(d) for d in re.split(r"[x,]", dims_text))
    if any(d < 1 for d in dims):
        raise ValueError(f"dimensions must be positive, got {dims_text!r}")
    return name, dims


def is_fixed(dim) -> bool:
    """A dimension with a value; some exporters (Paddle) write -1 for a symbolic one."""
    return dim.HasField("dim_value") and dim.dim_value > 0


def model_inputs(model: onnx.ModelProto) -> list[tuple[str, list[int | None]]]:
    """(name, dims) of the real graph inputs; None for a symbolic (or unknown) dimension."""
    init_names = {t.name for t in model.graph.initializer}
    return [(inp.name, [d.dim_value if is_fixed(d) else None for d in inp.type.tensor_type.shape.dim])
            for inp in model.graph.input if inp.name not in init_names]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed leading dimension of the model's first real input, or None when it is symbolic."""
    inputs = model_inputs(model)
    return inputs[0][1][0] if inputs and inputs[0][1] else None


def check_given(model: onnx.ModelProto, given) -> dict[str, tuple[int, ...]]:
    """``--input-shape`` values (``[(name or None, dims)]``) checked against the model's inputs:
    known names, matching ranks and fixed dims. Returns {name: dims} of each input's *first*
    shape, the working shape; later ones for the same input are ``verification_shapes``."""
    return _checked(model, given)[0]


def verification_shapes(model: onnx.ModelProto, given) -> list[dict[str, tuple[int, ...]]]:
    """The further shapes given for an input (``--input-shape x=1x3x640x640 --input-shape
    x=1x3x320x480``): the pruned model is verified at each of them too, after the working shape.
    Why: a rewrite decision can hold at one size only (a map that is 1×1 there); a detector used
    at several sizes should be checked at them. The k-th extra shape of every input forms set k
    (inputs given fewer times keep their working shape)."""
    return _checked(model, given)[1]


def _checked(model: onnx.ModelProto, given):
    inputs = dict(model_inputs(model))
    names = ", ".join(inputs) or "none"
    checked: dict[str, tuple[int, ...]] = {}
    extra: dict[str, list[tuple[int, ...]]] = {}
    for name, dims in (given.items() if isinstance(given, dict) else given or ()):
        dims = tuple(int(d) for d in dims)
        if any(d < 1 for d in dims):
            raise UserError(f"--input-shape {name}={'x'.join(map(str, dims))}: dimensions must be positive")
        if name is None:
            if len(inputs) != 1:
                raise UserError(f"--input-shape {'x'.join(map(str, dims))}: the model has {len(inputs)} inputs "
                                f"({names}); write NAME=DIMS")
            name = next(iter(inputs))
        label = f"--input-shape {name}={'x'.join(map(str, dims))}"
        if name not in inputs:
            raise UserError(f"{label}: the model has no input {name!r} (inputs: {names})")
        model_dims = inputs[name]
        if len(dims) != len(model_dims):
            raise UserError(f"{label}: input {name!r} has rank {len(model_dims)}, got {len(dims)} dimensions")
        for axis, (want, have) in enumerate(zip(dims, model_dims)):
            if have is not None and want != have:
                raise UserError(f"{label}: axis {axis} of {name!r} is fixed at {have} in the model, got {want}")
        if name in checked:
            if tuple(dims) != checked[name] and tuple(dims) not in extra.get(name, []):
                extra.setdefault(name, []).append(tuple(dims))
        else:
            checked[name] = tuple(dims)
    sets = [{name: shapes[k] if k < len(shapes) else checked[name] for name, shapes in extra.items()}
            for k in range(max((len(v) for v in extra.values()), default=0))]
    return checked, [{**checked, **s} for s in sets]


def resolve_input_shapes(model: onnx.ModelProto, given: dict[str, tuple[int, ...]] | None = None,
                         samples: dict[str, np.ndarray] | None = None) -> dict[str, InputShape]:
    """The working shape of every real input of ``model`` (the module's rules). ``given`` is
    ``check_given``'s result; ``samples`` the calibration feeds (axis 0: samples)."""
    shapes = {}
    for name, dims in model_inputs(model):
        resolved, source = [], "model"
        for axis, dim in enumerate(dims):
            if dim is not None:
                resolved.append(dim)
            elif axis == 0:
                resolved.append(None)
            elif given and name in given:
                resolved.append(given[name][axis])
                source = "--input-shape"
            elif samples is not None and name in samples and samples[name].ndim == len(dims):
                resolved.append(int(samples[name].shape[axis]))
                source = "calibration data"
            else:
                resolved.append(DEFAULT_DIM)
                source = "default"
        shapes[name] = InputShape(name, tuple(resolved), source)
    return shapes


def single_working_shapes(model: onnx.ModelProto, given, why: str) -> dict[str, InputShape]:
    """The working shape of every input from ``--input-shape`` values (``[(name or None, dims)]``),
    for a command that runs one shape (``bench``, ``autotune``): a further size for the same input,
    which pruning verifies at, is refused, saying ``why`` there is one."""
    if verification_shapes(model, given):
        raise UserError(f"--input-shape: give one size per input ({why})")
    return resolve_input_shapes(model, check_given(model, given))


def batch_names(model: onnx.ModelProto, shapes: dict[str, InputShape]) -> set[str]:
    """The names of the batch axes ``shapes`` leaves open. Such a name stays open wherever an
    input declares it (``with_input_shapes``) and takes the batch there (``verify.random_inputs``):
    silero-vad's ``state`` is ``2 x batch x 128``, and fixed apart its inputs disagreed."""
    names = set()
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        shape = shapes.get(inp.name)
        if shape is not None and shape.dims and shape.dims[0] is None and len(dims) and dims[0].dim_param:
            names.add(dims[0].dim_param)
    return names


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, InputShape] | None = None,
                      batch: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose symbolic input dims are set to ``shapes`` (default: resolved by
    the rules above); the batch axis stays symbolic unless ``batch`` is given."""
    shapes = resolve_input_shapes(model) if shapes is None else shapes
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    open_names = set() if batch is not None else batch_names(model, shapes)
    for inp in fixed.graph.input:
        shape = shapes.get(inp.name)
        if shape is None:
            continue
        for dim, value in zip(inp.type.tensor_type.shape.dim, shape.dims):
            value = batch if value is None else value
            if value is not None and not is_fixed(dim) and dim.dim_param not in open_names:
                dim.dim_value = value
    return fixed


def restore_input_dims(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give ``model``'s real inputs the dims ``original`` declares (its symbolic names included)."""
    init_names = {t.name for t in original.graph.initializer}
    declared = {inp.name: inp.type.tensor_type.shape for inp in original.graph.input
                if inp.name not in init_names and inp.type.tensor_type.HasField("shape")}
    for inp in model.graph.input:
        if inp.name in declared:
            inp.type.tensor_type.shape.CopyFrom(declared[inp.name])


def sizes_text(shapes: dict[str, InputShape]) -> str:
    """``x=Nx3x320x320, y=...``: a set of input shapes as the progress lines and reports name it."""
    return ", ".join(f"{name}={shape.text()}" for name, shape in shapes.items())


def describe(shapes: dict[str, InputShape]) -> str | None:
    """A progress line when some symbolic dims were fixed, saying how to change them; else None."""
    fixed = [s for s in shapes.values() if s.source != "model"]
    if not fixed:
        return None
    parts = []
    for s in fixed:
        how = {"default": f"symbolic dims set to {DEFAULT_DIM} by default",
               "calibration data": "from the calibration data", "--input-shape": "from --input-shape"}[s.source]
        parts.append(f"{s.name}={s.text()} ({how})")
    hint = "; set them with --input-shape NAME=DIMS" if any(s.source == "default" for s in fixed) else ""
    return ("input shapes for MACs, planning, calibration and verification: " + ", ".join(parts) + hint
            + " (the output keeps the symbolic dims)")
