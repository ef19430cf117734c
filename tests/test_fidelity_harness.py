"""The real-photo fidelity harness (benchmarks/photos.py, benchmarks/fidelity.py).

The split, crop and metric logic runs on tiny synthetic arrays (always). The check of the built
photo files runs only where ``samples/generated/`` holds them (``python benchmarks/photos.py``);
CI has no generated files, so it is skipped there.
"""

from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    """Import a benchmarks/ script under a private name (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


photos = _load("_onnxprune_bench_photos", ROOT / "benchmarks" / "photos.py")
fidelity = _load("_onnxprune_bench_fidelity", ROOT / "benchmarks" / "fidelity.py")

GENERATED = ROOT / "samples" / "generated"


# ----------------------------------------------------------------------------- split

def _strata():
    return {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(5)], "c": ["c0"]}


def test_split_is_by_group_with_the_fixed_fraction_per_stratum():
    split = photos.split_groups(_strata(), fraction=0.4, seed=0)
    assert set(split) == {g for gs in _strata().values() for g in gs}
    assert sum(split[g] == "eval" for g in _strata()["a"]) == 4
    assert sum(split[g] == "eval" for g in _strata()["b"]) == 2
    assert split["c0"] == "calib"  # round(0.4 * 1) = 0
    assert set(split.values()) <= {"eval", "calib"}


def test_split_is_deterministic_and_depends_on_the_seed():
    a = photos.split_groups(_strata(), 0.4, seed=0)
    assert a == photos.split_groups(_strata(), 0.4, seed=0)
    assert a == photos.split_groups({k: v[::-1] for k, v in reversed(list(_strata().items()))}, 0.4, 0)
    others = [photos.split_groups(_strata(), 0.4, seed=s) for s in range(1, 6)]
    assert any(o != a for o in others)


def test_a_group_in_two_strata_gets_one_split():
    strata = {"x": ["shared", "x1", "x2"], "y": ["shared", "y1", "y2", "y3"]}
    split = photos.split_groups(strata, 0.5, seed=3)
    assert split["shared"] in ("eval", "calib")
    assert len(split) == 6


def test_split_fraction_bounds():
    assert set(photos.split_groups(_strata(), 0.0).values()) == {"calib"}
    assert set(photos.split_groups(_strata(), 1.0).values()) == {"eval"}
    with pytest.raises(ValueError):
        photos.split_groups(_strata(), 1.5)


# ----------------------------------------------------------------------------- crops

def test_crop_boxes_centre_view_then_random_inside_the_image():
    w, h = 640, 480
    boxes = photos.crop_boxes(w, h, 6, photos.photo_rng(0, "x/y"))
    assert len(boxes) == 6
    left, top, right, bottom, flip = boxes[0]
    side = 480 * 224 / 256
    assert (right - left, bottom - top) == pytest.approx((side, side))
    assert ((left + right) / 2, (top + bottom) / 2) == pytest.approx((w / 2, h / 2))
    assert flip is False
    for left, top, right, bottom, flip in boxes[1:]:
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        area = (right - left) * (bottom - top)
        assert 0.3 ** 2 * 480 ** 2 * 0.9 <= area <= 480 * 480 * 4 / 3 * 1.001
        assert 3 / 4 - 1e-6 <= (right - left) / (bottom - top) <= 4 / 3 + 1e-6 or \
            right - left == w or bottom - top == h
    again = photos.crop_boxes(w, h, 6, photos.photo_rng(0, "x/y"))
    assert boxes == again
    assert boxes != photos.crop_boxes(w, h, 6, photos.photo_rng(0, "x/z"))


def test_photo_rng_is_per_photo():
    a = photos.photo_rng(1, "k").random(3)
    b = np.random.default_rng([1, zlib.crc32(b"k")]).random(3)
    assert np.array_equal(a, b)


def test_round_robin_covers_photos_first():
    order = photos.round_robin([3, 3, 1, 2], seed=0)
    assert len(order) == 9
    assert sorted(order) == sorted({(p, c) for p, n in enumerate([3, 3, 1, 2]) for c in range(n)})
    assert {p for p, _ in order[:4]} == {0, 1, 2, 3} and all(c == 0 for _, c in order[:4])
    assert [c for _, c in order] == sorted(c for _, c in order)


def test_make_crops_shapes_and_flip():
    Image = pytest.importorskip("PIL.Image")
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100, 0] = 255  # left half red
    im = Image.fromarray(arr)
    out = photos.make_crops(im, [(0, 0, 200, 100, False), (0, 0, 200, 100, True)])
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.uint8
    assert out[0, 0, :, :50].mean() > 250 and out[0, 0, :, -50:].mean() < 5
    assert np.array_equal(out[1], out[0][:, :, ::-1])


def test_rcc_reader_on_a_hand_built_file():
    # one root dir with a file "a.txt" (uncompressed) and a zlib-compressed "b.bin", format 1
    names = b""

    def name(s):
        nonlocal names
        off = len(names)
        enc = s.encode("utf-16-be")
        names += len(s).to_bytes(2, "big") + b"\0\0\0\0" + enc
        return off

    n_a, n_b = name("a.txt"), name("b.bin")
    body_b = zlib.compress(b"hello hello hello")
    data = len(b"AAA").to_bytes(4, "big") + b"AAA"
    off_b = len(data)
    data += (len(body_b) + 4).to_bytes(4, "big") + (17).to_bytes(4, "big") + body_b
    tree = (0).to_bytes(4, "big") + (2).to_bytes(2, "big") + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
    tree += n_a.to_bytes(4, "big") + (0).to_bytes(2, "big") + b"\0\0\0\0" + (0).to_bytes(4, "big")
    tree += n_b.to_bytes(4, "big") + (1).to_bytes(2, "big") + b"\0\0\0\0" + off_b.to_bytes(4, "big")
    header = 20
    blob = b"qres" + (1).to_bytes(4, "big") + header.to_bytes(4, "big") + (header + len(tree)).to_bytes(4, "big") \
        + (header + len(tree) + len(data)).to_bytes(4, "big") + tree + data + names
    files = photos.read_rcc(blob)
    assert files == {"a.txt": b"AAA", "b.bin": b"hello hello hello"}


# ----------------------------------------------------------------------------- metrics and modes

def test_metrics_identical_and_known_disagreement():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 10)).astype(np.float32)
    m = fidelity.fidelity_metrics(ref.copy(), ref)
    assert m["agreement"] == 1.0 and m["top5_overlap"] == 1.0 and m["ref_top1_in_top5"] == 1.0
    assert m["mean_kl"] == pytest.approx(0.0, abs=1e-9) and m["samples"] == 8
    # reverse the class order: top-1 never agrees, the top-5 sets of 10 classes are disjoint
    flipped = -ref
    m = fidelity.fidelity_metrics(flipped, ref)
    assert m["agreement"] == 0.0 and m["top5_overlap"] == 0.0 and m["ref_top1_in_top5"] == 0.0
    assert m["mean_kl"] > 0


def test_confident_agreement_counts_only_samples_the_reference_is_sure_of():
    ref = np.zeros((4, 3), dtype=np.float32)
    ref[0, 0] = ref[1, 1] = 10.0  # confident (p ~ 1)
    ref[2, 2] = ref[3, 0] = 0.1  # near-ties (p ~ 0.36)
    model = ref.copy()
    model[1] = [0, 0, 20]  # flips a confident one
    model[2] = [1, 0, 0]  # and a near-tie
    m = fidelity.fidelity_metrics(model, ref)
    assert m["agreement"] == 0.5
    assert m["confident_samples"] == 2 and m["agreement_confident"] == 0.5
    model[1] = ref[1]
    assert fidelity.fidelity_metrics(model, ref)["agreement_confident"] == 1.0


def test_topk_overlap_partial():
    ref = np.array([[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]], np.float32)
    other = np.array([[9, 8, 7, 0, 1, 2, 3, 4, 5, 6]], np.float32)  # top5 {0,1,2,9,8} vs {0,1,2,3,4}
    assert fidelity.topk_overlap(other, ref, 5) == pytest.approx(3 / 5)
    assert fidelity.topk_overlap(other, ref, 1) == 1.0


def test_mode_argv_expands_calib_and_passes_the_rest_through():
    c = Path("/d/photos_calib.npz")
    assert fidelity.mode_argv("default", c, 256) == []
    assert fidelity.mode_argv("default +calib", c, 256) == ["--calib", str(c), "--calib-size", "256"]
    assert fidelity.mode_argv("--groups 8 --rate 0.4375 +calib=64", c, 256) == \
        ["--groups", "8", "--rate", "0.4375", "--calib", str(c), "--calib-size", "64"]
    assert fidelity.mode_argv("--target-macs 0.7", c, 256, extra="--min-agreement 0.9") == \
        ["--target-macs", "0.7", "--min-agreement", "0.9"]
    assert fidelity.calib_count(fidelity.mode_argv("+calib", c, 32)) == 32
    assert fidelity.calib_count([]) is None


def test_pareto_front_and_table():
    pts = [(1.0, 1.0), (0.6, 0.2), (0.7, 0.1), (0.8, 0.9)]
    assert fidelity.pareto_front(pts) == [1, 3, 0]
    results = {"m": {"dense": {"imagenet20_top1": 0.9, "median_ms": 3.0}, "eval": {"samples": 10, "photos": 4},
                     "rows": [{"mode": "default", "calib": None,
                               "run": {"rc": 0, "wall_s": 1.0, "stderr_tail": []},
                               "report": {"macs_ratio": 0.6, "params_ratio": 0.5, "convs_pruned": 3},
                               "metrics": {"agreement": 0.5, "top5_overlap": 0.6, "mean_kl": 0.1},
                               "imagenet20_top1": 0.5, "latency_ratio": 0.7, "median_ms": 2.1},
                              {"mode": "bad", "calib": 256, "run": {"rc": 2, "wall_s": 0.1,
                                                                   "stderr_tail": ["onnxprune: error: x"]}}]}}
    table = fidelity.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "0.600" in lines[3] and "FAILED rc=2" in lines[4]


def test_report_summary_tolerates_missing_fields():
    s = fidelity.report_summary({"macs_before": 100, "macs_after": 60, "params_before": 10, "params_after": 5,
                                 "calibration": {"fidelity": {"samples": 8, "calibrated": {"top1_agreement": 0.5}}}})
    assert s["macs_ratio"] == 0.6 and s["params_ratio"] == 0.5 and s["heldout_agreement"] == 0.5
    assert fidelity.report_summary({})["macs_ratio"] is None


# ----------------------------------------------------------------------------- built files

def _npz_array_header(path: Path, key: str):
    """(shape, dtype) of one array in an .npz without decompressing it."""
    import zipfile

    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


@pytest.mark.skipif(not (GENERATED / "photos_calib.npz").is_file() or not (GENERATED / "photos_eval.npz").is_file()
                    or not (GENERATED / "mobilenet_v2.onnx").is_file(),
                    reason="samples/generated/photos_*.npz or mobilenet_v2.onnx absent (benchmarks/photos.py, "
                           "samples/make_imagenet_samples.py)")
def test_built_photo_files_load_as_calibration_and_are_split_by_photo():
    import onnx

    from onnxprune.calibration.calib_data import load_calibration_inputs

    model = onnx.load(str(GENERATED / "mobilenet_v2.onnx"), load_external_data=False)
    feeds = load_calibration_inputs(GENERATED / "photos_calib.npz", model, limit=8)
    (name, x), = feeds.items()
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    shapes = {name: _npz_array_header(GENERATED / f"photos_{name}.npz", "input") for name in ("calib", "eval")}
    assert all(dtype == np.uint8 and shape[1:] == (3, 224, 224) for shape, dtype in shapes.values())
    assert shapes["calib"][0][0] >= 512 and shapes["eval"][0][0] >= 300
    with np.load(GENERATED / "photos_calib.npz") as c, np.load(GENERATED / "photos_eval.npz") as e:
        assert set(c["files"].tolist()).isdisjoint(e["files"].tolist())
        assert len(c["files"]) >= 30 and len(e["files"]) >= 30
        for d, (shape, _) in ((c, shapes["calib"]), (e, shapes["eval"])):
            assert d["source"].max() < len(d["files"]) and len(d["source"]) == shape[0]
            # round-robin: the first len(files) samples are each photo's centre crop
            n = len(d["files"])
            assert sorted(d["source"][:n].tolist()) == list(range(n)) and not d["crop"][:n].any()
