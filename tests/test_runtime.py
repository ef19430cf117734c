"""runtime.create_session: the package's only ONNX Runtime session constructor."""

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from graphs import FAMILIES
from onnxprune.errors import UserError
from onnxprune.checks.runtime import create_session

PACKAGE = Path(__file__).resolve().parent.parent / "onnxprune"


def test_no_other_module_opens_a_session():
    """One place sets the session rules (spinning off, log level, load errors): a second
    ``InferenceSession(`` in the package would bypass them."""
    openers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "InferenceSession(" in p.read_text())
    assert openers == ["checks/runtime.py"]


def test_model_bytes_and_path_give_the_same_outputs(tmp_path):
    model = FAMILIES["vgg"]().model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    outs = []
    for source in (model, model.SerializeToString(), str(path), path):
        sess = create_session(source, threads=1)
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x})[0])
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_unloadable_model_is_a_one_line_user_error_worded_by_the_caller():
    with pytest.raises(UserError) as info:
        create_session(b"not a model", load_error="cannot load it: {reason}")
    message = str(info.value)
    assert message.startswith("cannot load it: ") and "\n" not in message


def test_own_models_fail_loudly():
    """``load_error=None`` (models onnxprune built): ORT's own exception, not a user error."""
    with pytest.raises(Exception) as info:
        create_session(b"not a model", load_error=None)
    assert not isinstance(info.value, UserError)
    assert isinstance(info.value, (onnxruntime.capi.onnxruntime_pybind11_state.Fail,
                                   onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf, RuntimeError))


def test_a_rewritten_model_ort_cannot_load_is_a_bug_not_bad_input():
    """verify(): the input model loads, the rewritten one does not -> not a UserError (exit 2
    would tell the user their input is bad)."""
    from onnxprune.ir.normalize import normalize
    from onnxprune.planning.plan import Plan
    from onnxprune.checks.verify import verify

    model = normalize(FAMILIES["vgg"]().model())
    broken = type(model)()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(Exception) as info:
        verify(model, broken, Plan([]))
    assert not isinstance(info.value, UserError)
