"""Latency cost model for speed-aware planning: what one Conv or Gather costs on a provider.

Two sources, one interface (``conv_us(ConvOp)``, ``gather_us(GatherOp)``, microseconds):

- ``AnalyticalModel``: no measurement needed. Time = per-op overhead + MACs / (throughput ×
  efficiency) + memory traffic (below). The efficiency numbers are the ones measured for ORT CPU (see
  shared/notes/ort-cpu-grouped-conv.md): a grouped Conv only runs on the fast blocked (NCHWc)
  path when its per-group input and output channel counts are multiples of the SIMD block
  (16 with AVX-512); off that path it runs at ~0.3× dense. On the path its efficiency grows with
  filters per group (16 → 0.46, 32 → 0.68, 64 → 0.88, ≥128 → ~1.0). A Gather costs a copy of
  the tensor it reads plus the layout reorders ORT inserts around it: ~7% of a 3×3 layer alone,
  but between blocked layers it forces ReorderOutput → Gather → ReorderInput; on ResNet-50
  @224 a plan with 13 Gathers before 1×1 convs ran 1.27× where the same MACs cut without
  Gathers ran 1.43× (batch 1, interleaved), so the copy cost is set to match that. The CUDA profile is a
  guess from public reports (cuDNN grouped convs need ≥32 channels per group); it has not been
  measured.

  Memory traffic (CPU): a dense Conv does not run at one speed per MAC. Timed inside the
  whole graph (ORT's profiler, fused Conv + Add + ReLU nodes; dense ResNet-50 at batch 1), the
  Convs on 14²–56² maps ran at 69–85 GMAC/s and those on 7² maps at 58–71: there a Conv does
  only 49 MACs per weight it loads, and moving its weights (which only the batch amortises) and
  maps costs more than its arithmetic. Ignoring that made the planner see a MAC of the last
  stage's stream readers and writers (1×1 Convs on 7² maps) as cheap as any other, and cut
  Convs on larger maps instead: at equal MACs its ResNet-50 plans ran 3–5% slower than
  Torch-Pruning's uniform cut. So each element moved costs ``mac_per_weight`` /
  ``mac_per_activation`` MACs' time (roofline-style, added to the arithmetic): 13 and 6 on CPU,
  fitted to the in-graph per-Conv times of ResNet-18/50 and MobileNetV2 variants (2 threads;
  at ~75 GMAC/s and 4-byte elements that is ~23 and ~50 GB/s). Checked on other timings
  (``benchmarks/results/cost_fit``: interleaved whole-model latencies of another day, 56
  variants and 4 dense models × 2 batches): the median error of the predicted speedup fell on
  the ResNets (ResNet-50 0.097 / 0.110 → 0.091 / 0.089 at batch 1 / 8, ResNet-18 0.126 / 0.080
  → 0.113 / 0.066) and moved by at most 0.011 on MobileNetV2 and EfficientNet-Lite0, and the
  ResNets' Spearman rose or held (0.88–0.93 → 0.93–0.99). The planner costs Convs at batch 1,
  where the weights are moved once per image; at batch 8 they are amortised (``ConvOp.batch``)
  but plans do not use that yet. The CUDA profile charges the maps only (``mac_per_activation``
  300, measured on an H100: see the profile's comment).
- ``MeasuredTable``: per-op latencies timed on the target machine by ``onnxprune autotune``
  and cached as JSON. Ops not in the table fall back to the analytical model, rescaled by the
  median measured/analytical ratio of the ops that are, so both sources stay on one scale.

Only relative costs matter to the planner; absolute numbers are reported but never promised.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..ir.macs import conv_macs

TABLE_FORMAT = "onnxprune-latency-table"
TABLE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """What a provider's fast convolution path needs, and rough speeds for the fallback model."""

    name: str
    align: int  # channel counts per group must be multiples of this for the fast path
    min_filters_per_group: int  # fewer filters per group is never worth grouping
    efficiency: tuple[tuple[int, float], ...]  # (filters per group, efficiency) on the fast path
    unaligned_grouped: float  # efficiency of a grouped Conv off the fast path
    unaligned_dense: float  # efficiency of a group=1 Conv whose channels miss the block size
    macs_per_us: float  # dense throughput
    op_overhead_us: float  # fixed cost per op (launch, layout bookkeeping)
    copy_us_per_element: float  # Gather / reorder cost per element moved
    mac_per_weight: float = 0.0  # a Conv's weight element moved costs this many MACs' time
    mac_per_activation: float = 0.0  # an element of its input or output map likewise


PROFILES = {
    "cpu": Profile("cpu", align=16, min_filters_per_group=16,
                   efficiency=((16, 0.46), (32, 0.68), (64, 0.88), (128, 0.97)),
                   unaligned_grouped=0.3, unaligned_dense=0.6, macs_per_us=40e3, op_overhead_us=8.0,
                   copy_us_per_element=2e-3, mac_per_weight=13.0, mac_per_activation=6.0),
    # Grouped efficiencies unmeasured per shape: public reports say cuDNN grouped convs are
    # efficient only with >= 32 channels per group; tensor-core paths want multiples of 8.
    # mac_per_activation: measured on an H100 (eighth session, benchmarks/README.md "CUDA in
    # deployment settings"): at fp16 batch 128 the time follows the activation maps, not the MACs
    # (a fit: 7.6e-6 us per output element, ~0 per MAC). Without it ResNet-50's plan ran 1.07x
    # dense (Torch-Pruning 1.20x at equal MACs); with 30 / 300, 1.30x / 1.61x, MobileNetV2 2.23x ->
    # 2.31x / 2.32x, and with CUDA graphs at batch 1 still 1.08x / 1.06x dense. 300 is kept.
    "cuda": Profile("cuda", align=8, min_filters_per_group=32,
                    efficiency=((32, 0.45), (64, 0.65), (128, 0.85), (256, 0.95)),
                    unaligned_grouped=0.3, unaligned_dense=0.7, macs_per_us=4e6, op_overhead_us=6.0,
                    copy_us_per_element=2e-6, mac_per_activation=300.0),
}


def profile(provider: str) -> Profile:
    try:
        return PROFILES[provider]
    except KeyError:
        raise UserError(f"unknown provider {provider!r} (expected one of {', '.join(PROFILES)})") from None


@dataclass(frozen=True)
class ConvOp:
    """One Conv as it will execute: ``c_in`` is the channel count of the tensor it reads."""

    c_in: int
    c_out: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    h_out: int
    w_out: int
    batch: int = 1

    @property
    def macs(self) -> int:
        return conv_macs(self.c_out, self.c_in // self.groups, self.kernel, (self.h_out, self.w_out), self.batch)

    @property
    def weight_elements(self) -> int:
        return self.c_out * (self.c_in // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def map_elements(self) -> int:
        """Elements of the input and output maps (the input's size taken as output × stride)."""
        h_in, w_in = self.h_out * self.stride[0], self.w_out * self.stride[1]
        return self.batch * (self.c_in * h_in * w_in + self.c_out * self.h_out * self.w_out)

    @property
    def key(self) -> str:
        return (f"conv:{self.c_in}-{self.c_out}-g{self.groups}-k{self.kernel[0]}x{self.kernel[1]}"
                f"-s{self.stride[0]}x{self.stride[1]}-o{self.h_out}x{self.w_out}-b{self.batch}")


@dataclass(frozen=True)
class GatherOp:
    """Gather(axis=1) of ``c_out`` channels out of a ``c_src``-channel tensor of size h × w."""

    c_src: int
    c_out: int
    h: int
    w: int
    batch: int = 1

    @property
    def key(self) -> str:
        return f"gather:{self.c_src}-{self.c_out}-{self.h}x{self.w}-b{self.batch}"


def on_fast_path(op: ConvOp, prof: Profile) -> bool:
    """True when ORT can run ``op`` in its blocked layout (per-group channels block-aligned).

    For group=1 ORT also accepts fewer input channels than one block (e.g. an RGB stem).
    """
    per_group_in, per_group_out = op.c_in // op.groups, op.c_out // op.groups
    if per_group_out % prof.align:
        return False
    if op.groups == 1:
        return per_group_in % prof.align == 0 or per_group_in < prof.align
    return per_group_in % prof.align == 0


def grouped_efficiency(filters_per_group: int, prof: Profile) -> float:
    """Efficiency of a blocked grouped Conv, log-interpolated in filters per group."""
    points = prof.efficiency
    if filters_per_group <= points[0][0]:
        return points[0][1] * filters_per_group / points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if filters_per_group <= x1:
            t = (math.log2(filters_per_group) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + t * (y1 - y0)
    return points[-1][1]


class AnalyticalModel:
    """Latency estimates from MACs, the fast-path rules and the measured efficiency curve."""

    source = "analytical"

    def __init__(self, provider: str = "cpu"):
        self.provider = provider
        self.profile = profile(provider)

    def efficiency(self, op: ConvOp) -> float:
        prof = self.profile
        fast = on_fast_path(op, prof)
        if op.groups == 1:
            return 1.0 if fast else prof.unaligned_dense
        eff = grouped_efficiency(op.c_out // op.groups, prof)
        return eff if fast else eff * prof.unaligned_grouped

    def conv_us(self, op: ConvOp) -> float:
        prof = self.profile
        return (prof.op_overhead_us + op.macs / (prof.macs_per_us * self.efficiency(op))
                + (prof.mac_per_weight * op.weight_elements + prof.mac_per_activation * op.map_elements)
                / prof.macs_per_us)

    def gather_us(self, op: GatherOp) -> float:
        """Copy of the gathered channels plus ORT's reorder out of and back into blocked layout."""
        moved = op.batch * op.h * op.w * (op.c_src + op.c_out)
        return self.profile.op_overhead_us + moved * self.profile.copy_us_per_element


class MeasuredTable:
    """Latencies measured by ``onnxprune autotune``; unknown ops use the rescaled fallback."""

    source = "measured"

    def __init__(self, provider: str, entries: dict[str, float] | None = None, meta: dict | None = None):
        self.provider = provider
        self.entries = dict(entries or {})
        self.meta = dict(meta or {})
        self.fallback = AnalyticalModel(provider)
        self.hits = self.misses = 0
        self._scale = None

    def scale(self) -> float:
        """Median of measured / analytical over the table: puts fallback estimates on its scale."""
        if self._scale is None:
            ratios = [us / self._analytical(key) for key, us in self.entries.items() if self._analytical(key)]
            self._scale = statistics.median(ratios) if ratios else 1.0
        return self._scale

    def _analytical(self, key: str) -> float | None:
        op = parse_key(key)
        if op is None:
            return None
        return self.fallback.conv_us(op) if isinstance(op, ConvOp) else self.fallback.gather_us(op)

    def _lookup(self, key: str, estimate: float) -> float:
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        return estimate * self.scale()

    def conv_us(self, op: ConvOp) -> float:
        return self._lookup(op.key, self.fallback.conv_us(op))

    def gather_us(self, op: GatherOp) -> float:
        return self._lookup(op.key, self.fallback.gather_us(op))

    def to_json(self) -> str:
        data = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "provider": self.provider,
                "meta": self.meta, "entries_us": dict(sorted(self.entries.items()))}
        return json.dumps(data, indent=1) + "\n"

    def save(self, path) -> None:
        from ..ir.model_io import write_text_atomic

        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path, provider: str | None = None, label: str = "--latency-table") -> "MeasuredTable":
        """The table at ``path``; any problem is a one-line UserError starting with ``label path``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{label} {path}: no such file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of > 4300 digits
            raise UserError(f"{label} {path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise UserError(f"{label} {path}: cannot read it ({exc.strerror or exc})") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise UserError(f"{label} {path}: not an onnxprune latency table "
                            f"(expected \"format\": \"{TABLE_FORMAT}\"; make one with 'onnxprune autotune')")
        if data.get("version") != TABLE_VERSION:
            raise UserError(f"{label} {path}: version {data.get('version')} is not supported")
        try:
            table_provider, entries, meta = _check_table(data)
        except ValueError as exc:
            raise UserError(f"{label} {path}: {exc} (remake it with 'onnxprune autotune')") from None
        if provider is not None and table_provider != provider:
            raise UserError(f"{label} {path} was measured on provider {table_provider!r}, "
                            f"not {provider!r}")
        return cls(table_provider, entries, meta)


def _check_table(data: dict) -> tuple[str, dict[str, float], dict]:
    """The provider, entries and meta of a table's JSON; ValueError says what is malformed."""
    provider = data.get("provider")
    if not isinstance(provider, str) or provider not in PROFILES:
        raise ValueError(f"\"provider\" must be one of {', '.join(map(repr, PROFILES))}, got {provider!r}")
    raw = data.get("entries_us", {})
    if not isinstance(raw, dict):
        raise ValueError(f"\"entries_us\" must be an object of op keys to microseconds, "
                         f"got {type(raw).__name__}")
    entries = {}
    for key, value in raw.items():
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float range
                pass
        if number is None or not math.isfinite(number) or number < 0:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"entry {key!r} must be a finite number of microseconds >= 0, got {shown}")
        entries[str(key)] = number
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"\"meta\" must be an object, got {type(meta).__name__}")
    return provider, entries, meta


def parse_key(key: str) -> ConvOp | GatherOp | None:
    """Inverse of ``ConvOp.key`` / ``GatherOp.key``; None for keys this version does not know."""
    try:
        kind, rest = key.split(":", 1)
        parts = rest.split("-")
        batch = int(parts[-1][1:])
        if kind == "conv":
            c_in, c_out, g, k, s, o = parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]
            kh, kw = (int(v) for v in k[1:].split("x"))
            sh, sw = (int(v) for v in s[1:].split("x"))
            ho, wo = (int(v) for v in o[1:].split("x"))
            return ConvOp(int(c_in), int(c_out), int(g[1:]), (kh, kw), (sh, sw), ho, wo, batch)
        if kind == "gather":
            h, w = (int(v) for v in parts[2].split("x"))
            return GatherOp(int(parts[0]), int(parts[1]), h, w, batch)
    except (ValueError, IndexError):
        return None
    return None


def load_cost_model(provider: str = "cpu", table_path=None):
    """The measured table at ``table_path`` if given, else the analytical model."""
    if table_path:
        return MeasuredTable.load(table_path, provider)
    return AnalyticalModel(provider)
