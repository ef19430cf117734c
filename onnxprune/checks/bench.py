"""``onnxprune bench``: latency of ONNX models side by side in ONNX Runtime, and ``check_speed``.

Why interleaved: on a shared machine the load drifts over seconds, so timing model A for a
minute and then model B compares two different machines. Every model is loaded once, warmed
up, and then the models take turns one run at a time, the order rotating each round (A B C,
B C A, C A B, ...): every model takes every position equally often and, with three or more
models, none runs twice in a row (a run right after its own may find its weights still in the
cache; with two, A B | B A gives each model one such run per two rounds). Medians (and p90)
over those runs are compared; ratios are to the first model.

Why a paired ratio too: on a shared or virtual machine the speed itself moves by tens of percent
over minutes (this project's 2-core VM: a dense ResNet-50 at 57–83 ms in one afternoon), and a
difference of a few percent between two models is then easily noise. The runs of one round are
adjacent in time, so each round's ratio (model / first model) cancels most of that drift; the
median of those per-round ratios, with a 95% bootstrap interval over the rounds (fixed seed, so
the report is reproducible from the same timings), says whether a difference is more than the
noise: an interval that contains 1.0 is no measured difference.

Session settings are fixed and printed: graph optimization ORT_ENABLE_ALL (the only level at
which ORT's blocked NCHWc convolutions are used on CPU), sequential execution, an explicit
intra-op thread count, and on CUDA a pinned ``cudnn_conv_algo_search`` (it dominates conv time).

CUDA options (``--provider cuda``): ``--nhwc`` sets the CUDA EP's ``prefer_nhwc`` (channels-last
convolution kernels; ORT inserts the layout transposes), ``--cuda-graph`` its ``enable_cuda_graph``:
each model's kernels are captured once as a CUDA graph and every timed run is one graph launch,
which removes the per-kernel launch cost that dominates small batches. A graph replays fixed
device addresses and shapes, so it needs the inputs and outputs bound on the GPU (not with
``--host-io``), every compute node on the CUDA EP, and its own session per batch size; a model
that cannot be captured is a one-line error naming it. Inputs are random arrays of each input's
own element type (an fp16 model with fp16 inputs is fed float16).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx

from ..errors import PassFailed, UserError
from ..ir.shapes import fixed_batch, single_working_shapes, sizes_text, with_input_shapes
from .verify import random_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CHECK_MARGIN = 0.02  # check_speed tolerates a pruned/original per-round latency ratio up to 1.02
BOOTSTRAP_RESAMPLES = 2000  # resamples of the rounds for the paired ratio's 95% interval


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Settings:
    provider: str = "cpu"
    threads: int = 0  # 0 = default_threads()
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    host_io: bool = False  # CUDA: time the host<->device copies of inputs and outputs too
    cuda_graph: bool = False  # CUDA: capture once, time graph replays (the module docstring)
    prefer_nhwc: bool = False  # CUDA: the EP's channels-last kernels

    def resolved_threads(self) -> int:
        return self.threads or default_threads()

    def validate(self) -> None:
        """A combination that cannot be timed as asked is a one-line UserError, before any work."""
        if self.provider != "cuda":
            for flag, on in (("--cuda-graph", self.cuda_graph), ("--nhwc", self.prefer_nhwc)):
                if on:
                    raise UserError(f"{flag} is an option of the CUDA provider: use it with --provider cuda")
        if self.cuda_graph and self.host_io:
            raise UserError("--cuda-graph replays on fixed GPU buffers, so it cannot time --host-io's "
                            "host<->device copies: use one or the other")

    def cuda_options(self) -> dict[str, str]:
        """The CUDA EP's provider options, as strings: ORT's Python binding str()s every value
        before the EP parses it, so "1"/"0" is what the EP sees whatever type is passed."""
        return {"cudnn_conv_algo_search": self.cudnn_conv_algo_search,
                "enable_cuda_graph": "1" if self.cuda_graph else "0",
                "prefer_nhwc": "1" if self.prefer_nhwc else "0"}

    def as_dict(self) -> dict:
        import onnxruntime as ort

        data = {"onnxruntime": ort.__version__, "provider": PROVIDERS[self.provider],
                "graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "ORT_SEQUENTIAL",
                "intra_op_num_threads": self.resolved_threads(), "inter_op_num_threads": 1,
                "intra_op_allow_spinning": 0}
        if self.provider == "cuda":
            data.update(cudnn_conv_algo_search=self.cudnn_conv_algo_search, cuda_graph=self.cuda_graph,
                        prefer_nhwc=self.prefer_nhwc, io=self.io_text())
        return data

    def io_text(self) -> str:
        """How inputs and outputs move in a timed CUDA run (the report's ``io``)."""
        if self.host_io:
            return "numpy in/out (host<->device copies timed)"
        graph = ", one CUDA graph replay per run" if self.cuda_graph else ""
        return f"IOBinding, inputs and outputs on the GPU (copies not timed){graph}"


def make_session(model: onnx.ModelProto, settings: Settings, label: str = "the model"):
    """An InferenceSession with the fixed settings above; a provider that is missing is an error.

    With ``cuda_graph`` ORT refuses, when the session is created, a model whose compute nodes are
    not all on the CUDA EP (or that has control flow); that refusal, like a session that came up
    without CUDA at all, is a one-line error naming ``label``, not ORT's traceback.
    """
    import onnxruntime as ort

    from .runtime import create_session

    wanted = PROVIDERS[settings.provider]
    if wanted not in ort.get_available_providers():
        raise UserError(f"provider {settings.provider} ({wanted}) is not available in this onnxruntime "
                        f"(available: {', '.join(ort.get_available_providers())})")
    providers = [wanted]
    if settings.provider == "cuda":
        providers = [(wanted, settings.cuda_options()), "CPUExecutionProvider"]
    load_error = "ONNX Runtime cannot load the model: {reason}"
    if settings.cuda_graph:
        load_error = _braces(label) + ": cannot be run as a CUDA graph (--cuda-graph): {reason}"
    # several sessions take turns in one process: runtime.create_session turns spinning off
    sess = create_session(model, providers=providers, threads=settings.resolved_threads(), inter_threads=1,
                          sequential=True, load_error=load_error)
    if wanted not in sess.get_providers():
        running = ", ".join(sess.get_providers())
        if settings.cuda_graph:
            raise UserError(f"{label}: cannot be run as a CUDA graph (--cuda-graph): {wanted} could not be "
                            f"initialised, the session runs on {running}")
        raise UserError(f"{wanted} could not be initialised (session runs on {running})")
    return sess


def _braces(text: str) -> str:
    """``text`` safe inside a ``str.format`` template (a model path may hold braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def make_feeds(model: onnx.ModelProto, batch: int, seed: int = 0, given=None) -> dict[str, np.ndarray]:
    """Seeded random inputs, each of its input's own element type (float16 for an fp16 input,
    zeros for integer inputs); a symbolic first dimension becomes ``batch``, other symbolic ones
    ``given`` (``check_given``'s {name: dims}) or the default size (verify.random_inputs)."""
    return random_inputs(model, seed=seed, batch=batch, given=given)


def reporting_failures(run_once: Callable[[], object], label: str, feeds: dict, hint: str = "") -> Callable[[], object]:
    """``run_once`` whose failure is a one-line ``UserError`` naming the model, the input shapes
    and ``hint`` (what to do): a model ONNX Runtime cannot run at these inputs (a Flatten -> Gemm
    head sized for another resolution, a symbolic channel axis) must not end the command in a
    traceback. The ``try`` costs nothing on the timed path."""
    from .runtime import ort_reason

    def run():
        try:
            return run_once()
        except Exception as exc:  # ORT raises several unrelated types for a failed run
            shapes = ", ".join(f"{name}={'x'.join(map(str, value.shape))}" for name, value in feeds.items())
            raise UserError(f"{label}: ONNX Runtime cannot run it at {shapes}: {ort_reason(exc)}"
                            + (f" ({hint})" if hint else "")) from None
    return run


def failure_hint(shapes: dict, batch: int) -> str:
    """What may make a failed run work: sizes for symbolic axes the user did not give (they were
    guessed: ``InputShape.source`` "default"), else a smaller batch (a graph that hard-codes batch
    1), else nothing to suggest."""
    if any(shape.source == "default" for shape in shapes.values()):
        return "give the input size with --input-shape"
    if batch > 1:
        return f"at batch {batch}; try --batch 1"
    return ""


def interleave(runners: Sequence[Callable[[], object]], repeat: int, warmup: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per run for each runner: ``warmup`` untimed rounds, then ``repeat`` timed rounds.

    Each round runs every runner once, round r starting at runner r (mod n) and going on in
    order (the module docstring says why); ``samples[i][r]`` is runner i's time in round r.
    """
    n = len(runners)
    for _ in range(warmup):
        for i in range(n):
            runners[i]()
    samples: list[list[float]] = [[] for _ in runners]
    for r in range(repeat):
        for i in ((r + k) % n for k in range(n)):
            start = clock()
            runners[i]()
            samples[i].append(clock() - start)
    return samples


def summarize(seconds: Sequence[float]) -> dict:
    """Median, p90 (linear interpolation) and min in milliseconds, and the sample count."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "min_ms": round(float(ms.min()), 4), "runs": int(ms.size)}


def paired_ratio(seconds: Sequence[float], reference: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> dict:
    """Median of the per-round ratios ``seconds[r] / reference[r]`` and its 95% bootstrap
    interval (percentiles of the median over ``resamples`` resamplings of the rounds)."""
    ratios = np.asarray(seconds, dtype=np.float64) / np.asarray(reference, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, ratios.size, size=(resamples, ratios.size))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"paired_ratio": round(float(np.median(ratios)), 4),
            "paired_ratio_ci95": [round(float(low), 4), round(float(high), 4)]}


def model_stats(model: onnx.ModelProto) -> dict:
    from ..ir.macs import count_macs, count_params

    return {"macs": count_macs(model)[0], "params": count_params(model)}


def compare(models: Sequence[onnx.ModelProto], labels: Sequence[str], batches: Sequence[int],
            settings: Settings, repeat: int = 30, warmup: int = 5, seed: int = 0, input_shapes=None) -> dict:
    """Interleaved timing of ``models`` at each batch size; a JSON-ready report. ``input_shapes``:
    ``--input-shape`` values (``[(name or None, dims)]``) for symbolic axes other than the batch,
    checked against every model."""
    settings.validate()
    shapes = [single_working_shapes(m, input_shapes, "the benchmark times one shape; the batch comes from --batch")
              for m in models]
    given = [{name: shape.dims for name, shape in sh.items()} for sh in shapes]  # the feeds' sizes
    stats = [{**model_stats(with_input_shapes(m, shape)), "input_shapes": sizes_text(shape)}
             for m, shape in zip(models, shapes)]  # MACs at the sizes timed

    def open_sessions():
        return [make_session(m, settings, label) for m, label in zip(models, labels)]

    # a CUDA graph is captured for one set of shapes and addresses: graph mode opens sessions per batch
    shared = None if settings.cuda_graph else open_sessions()
    fixed = [fixed_batch(m) for m in models]
    if all(fixed):
        batches = [fixed[0]]  # nothing to vary: every model runs at its own batch
    results = []
    for batch in batches:
        sessions = shared or open_sessions()
        feeds = [make_feeds(m, fixed[i] or batch, seed, given[i]) for i, m in enumerate(models)]
        runners = [reporting_failures(runner(sess, feed, settings, label), label, feed,
                                      failure_hint(shape, fixed_b or batch))
                   for sess, feed, label, shape, fixed_b in zip(sessions, feeds, labels, shapes, fixed)]
        samples = interleave(runners, repeat, warmup)
        del sessions, runners  # graph mode: the next batch's sessions do not sit beside these on the GPU
        rows = []
        for i, secs in enumerate(samples):
            row = {"model": labels[i], "batch": fixed[i] or batch, **summarize(secs),
                   "runs_ms": [round(x * 1e3, 4) for x in secs]}  # in round order: pairs with any other row
            rows.append(row)
        first = rows[0]["median_ms"]
        for row, secs in zip(rows, samples):
            row["ratio_to_first"] = round(row["median_ms"] / first, 4)
            row["speedup_vs_first"] = round(first / row["median_ms"], 4)
            if row is not rows[0]:
                row.update(paired_ratio(secs, samples[0]))
        results.append({"batch": batch, "rows": rows})
    return {"settings": settings.as_dict(), "repeat": repeat, "warmup": warmup,
            "models": [{"model": label, **s, "fixed_batch": f} for label, s, f in zip(labels, stats, fixed)],
            "results": results}


def runner(sess, feeds: dict, settings: Settings, label: str = "the model") -> Callable[[], object]:
    """One inference of ``sess`` on ``feeds``, as a callable to time.

    On CUDA (unless ``settings.host_io``) the inputs are copied to the GPU once and the outputs
    stay there (IOBinding): a model that is 1.5x faster in its kernels is otherwise diluted by the
    same PCIe copies in both runs (ResNet-50 batch 32: ~19 MB in per run). With
    ``settings.cuda_graph`` the graph is captured here (``graph_runner``).
    """
    if settings.provider != "cuda" or settings.host_io:
        return lambda: sess.run(None, feeds)
    if settings.cuda_graph:
        return graph_runner(sess, feeds, label)
    return device_runner(sess, feeds, "cuda")


def device_runner(sess, feeds: dict, device: str) -> Callable[[], object]:
    """Inputs copied to ``device`` once and bound, outputs bound to ``device``: every run reads
    the same input buffers (held here, not only by the binding), and the outputs ORT allocates in
    the first run stay bound and are written in place by the later ones."""
    import onnxruntime as ort

    binding = sess.io_binding()
    inputs = {name: ort.OrtValue.ortvalue_from_numpy(value, device, 0) for name, value in feeds.items()}
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)

    def run():
        sess.run_with_iobinding(binding)
        return binding
    run.inputs = inputs  # keeps the device buffers alive as long as the runner
    return run


def graph_runner(sess, feeds: dict, label: str) -> Callable[[], object]:
    """``device_runner`` on a session made with ``enable_cuda_graph``, its graph captured now.

    ORT captures on the first run with the binding (a regular run, then the capture) and replays
    the captured kernels on the same device addresses on every later run, which is why the
    buffers are bound once and never rebound. A capture that fails (an op that cannot be captured,
    a shape that changes) is a one-line error naming ``label`` here, not a traceback in the timing.
    """
    from .runtime import ort_reason

    run = device_runner(sess, feeds, "cuda")
    try:
        run()
    except Exception as exc:  # ORT raises several unrelated types
        raise UserError(f"{label}: the CUDA graph capture failed (--cuda-graph needs static shapes and "
                        f"every node on the GPU): {ort_reason(exc)}") from None
    return run


def format_report(report: dict) -> str:
    s = report["settings"]
    head = (f"onnxruntime {s['onnxruntime']}, {s['provider']}, {s['graph_optimization_level']}, "
            f"{s['execution_mode']}, intra_op_num_threads={s['intra_op_num_threads']}")
    io = []
    if "cudnn_conv_algo_search" in s:  # CUDA: every provider option, and how inputs and outputs move
        head += (f", cudnn_conv_algo_search={s['cudnn_conv_algo_search']}, "
                 f"cuda_graph={_on(s.get('cuda_graph'))}, prefer_nhwc={_on(s.get('prefer_nhwc'))}")
        io = [f"io: {s['io']}"]
    lines = [head, *io, f"interleaved: {report['warmup']} warm-up + {report['repeat']} timed runs per model and batch",
             "", "| model | inputs | MACs per run | params |", "|---|---|---|---|"]
    for m in report["models"]:
        fixed = f" (fixed batch {m['fixed_batch']})" if m["fixed_batch"] else ""
        per_run = f"{m['macs'] / 1e9:.3f} G" + (f" (batch {m['fixed_batch']})" if m["fixed_batch"] else " (batch 1)")
        lines.append(f"| {m['model']}{fixed} | {m.get('input_shapes', '')} | {per_run} | {m['params'] / 1e6:.3f} M |")
    lines += ["", "| model | batch | median ms | p90 ms | ratio to first | speedup | paired ratio (95% interval) |",
              "|---|---|---|---|---|---|---|"]
    for result in report["results"]:
        for row in result["rows"]:
            paired = "–"
            if "paired_ratio" in row:
                low, high = row["paired_ratio_ci95"]
                paired = f"{row['paired_ratio']:.3f} [{low:.3f}, {high:.3f}]"
            lines.append(f"| {row['model']} | {row['batch']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} | "
                         f"{row['ratio_to_first']:.3f} | {row['speedup_vs_first']:.2f}x | {paired} |")
    return "\n".join(lines)


def _on(flag) -> str:
    return "on" if flag else "off"


def check_speed(original: onnx.ModelProto, pruned: onnx.ModelProto, provider: str = "cpu",
                threads: int = 0, batch: int = 1, min_rounds: int = 20, max_rounds: int = 200,
                min_seconds: float = 3.0, margin: float = CHECK_MARGIN, fail: bool = True) -> dict:
    """Measure ``pruned`` against ``original``; raise PassFailed if it is slower (with
    ``fail=False`` only report it: ``passed`` in the result; the pipeline's gates decide).

    Rule: both models run interleaved (after 5 warm-up rounds) for at least ``min_rounds`` rounds
    and at least ``min_seconds``, at most ``max_rounds``. ratio = the median of the per-round
    ratios pruned / original (``paired_ratio``; the ratio of the two medians is reported beside it:
    a load step inside a round can throw that one off by a factor). ratio > 1 + margin (default
    1.02) fails with "slower than the input". The 2% margin is the run-to-run spread of
    interleaved medians on a loaded 2-core machine (notes: 1–4%); a pruned model that is
    identical in speed (e.g. every layer left dense) is not reported as slower.
    """
    settings = Settings(provider, threads)
    sessions = [make_session(m, settings) for m in (original, pruned)]
    fixed = fixed_batch(original)
    feeds = [make_feeds(m, fixed or batch) for m in (original, pruned)]
    runners = [runner(s, f, settings) for s, f in zip(sessions, feeds)]
    samples = interleave(runners, 0, warmup=5)
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_seconds):
        more = interleave(runners, 2, warmup=0)
        for acc, new in zip(samples, more):
            acc.extend(new)
        rounds += 2
    before, after = summarize(samples[0]), summarize(samples[1])
    paired = paired_ratio(samples[1], samples[0])
    ratio = paired["paired_ratio"]
    result = {"settings": settings.as_dict(), "batch": fixed or batch, "rounds": rounds,
              "original_median_ms": before["median_ms"], "pruned_median_ms": after["median_ms"],
              "original_p90_ms": before["p90_ms"], "pruned_p90_ms": after["p90_ms"],
              "ratio": ratio, "ratio_ci95": paired["paired_ratio_ci95"],
              "ratio_of_medians": round(after["median_ms"] / before["median_ms"], 4),
              "speedup": round(1 / ratio, 4), "margin": margin, "passed": bool(ratio <= 1.0 + margin)}
    if fail and not result["passed"]:
        raise PassFailed(f"the pruned model is slower than the input on {provider}: per-round latency ratio "
                         f"{ratio:.3f} > {1 + margin:.2f} (medians {after['median_ms']:.3f} ms vs "
                         f"{before['median_ms']:.3f} ms); nothing written")
    return result
