"""Issue 12 in the planner: Ctrl-C during parallel planning stops at once and quietly, and a bad
seed is a one-line UserError for library users too."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import onnxprune.gkp.planner as planner
from graphs import GraphBuilder
from onnxprune.errors import UserError
from onnxprune.gkp.planner import PlanOptions

SLOW = 1.0  # seconds per layer in the slowed-down planner
_real_plan_layer = planner.plan_layer


def slow_plan_layer(*args):  # module level: the pool pickles it by name into the forked workers
    time.sleep(SLOW)
    return _real_plan_layer(*args)


def sigint_handler(*args):
    return signal.getsignal(signal.SIGINT)


def _chain(n):
    """``n`` 16-channel 3x3 convs in a row: ``n`` small prunable layers."""
    b = GraphBuilder(channels=16, size=8)
    x = "input"
    for _ in range(n):
        x = b.relu(b.conv(x, 16))
    b.output(x)
    return b.model()


def _force_parallel(monkeypatch):
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("the parallel planner needs fork")
    monkeypatch.setattr(planner, "PARALLEL_MIN_WEIGHTS", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def test_workers_ignore_ctrl_c_and_the_parent_keeps_its_handler(monkeypatch):
    _force_parallel(monkeypatch)
    monkeypatch.setattr(planner, "plan_layer", sigint_handler)
    jobs = [(SimpleNamespace(name=f"conv{i}"), np.zeros(4), []) for i in range(4)]
    assert planner._plan_layers(jobs, PlanOptions(), None) == [signal.SIG_IGN] * 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_during_parallel_planning_propagates_at_once(monkeypatch):
    _force_parallel(monkeypatch)
    monkeypatch.setattr(planner, "plan_layer", slow_plan_layer)
    raised_at = []

    def progress(done, total, name):
        if done == 1:  # the first layer is planned; 7 are queued or running
            raised_at.append(time.monotonic())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        planner.plan_model(_chain(8), PlanOptions(groups=2), progress=progress)
    # Waiting for the queued layers (what a `with` pool does) takes ~3 * SLOW.
    assert time.monotonic() - raised_at[0] < SLOW


def test_ctrl_c_in_a_terminal_prints_no_worker_traceback(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: only the parent reacts."""
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("the parallel planner needs fork")
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import onnxprune.gkp.planner as planner
        from test_planner_safety import _chain

        planner.PARALLEL_MIN_WEIGHTS = 0
        os.cpu_count = lambda: 2
        real = planner.plan_layer

        def slow(*args):
            time.sleep({SLOW})
            return real(*args)

        planner.plan_layer = slow

        def progress(done, total, name):
            if done == 0:
                print("started", flush=True)

        try:
            planner.plan_model(_chain(8), planner.PlanOptions(groups=2), progress=progress)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(planner.__file__).parents[1])})
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.3)  # both workers are inside a layer
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "interrupted" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert elapsed < 2 * SLOW


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", True, None])
def test_bad_seed_is_a_user_error(seed):
    with pytest.raises(UserError, match="--seed"):
        PlanOptions(seed=seed).check()


@pytest.mark.parametrize("seed", [0, 2**32 - 1, np.int64(7)])
def test_good_seeds(seed):
    PlanOptions(seed=seed).check()
