"""The pruning plan: every decision between planning and rewriting, as plain JSON data.

Why plain data: a plan can be written (``--plan-out``), inspected, edited, re-applied to a
re-exported model (``--plan-in``) or to the training-framework model for fine-tuning, and the
rewriter can be tested on hand-made plans without running the planner.

Per pruned Conv the plan holds:
- ``filter_order``: new output position j -> original filter index; groups are contiguous
  blocks of ``c_out / groups`` positions.
- ``kept_in_channels``: for each group, the sorted original input channels it keeps.
- how it was decided (``clustering_method``, ``criterion``, ``scores``) and, since version 2,
  ``provenance``: which stage chose the structure (groups and kept count) and which the kept
  channels, with the fraction of input channels each group keeps — the answer to "why did this
  layer keep these channels?" in one place. Version 1 plans still load (no provenance).
Since version 3 a plan also records the coupled channel groups it narrows (``coupled``: each
group's members — (tensor, channel offset) pairs, as ``channels.channel_groups`` finds them —
its width and the group channels kept), so a plan of the default mode can be replayed; a reader
of an older version would silently drop them, hence the version bump.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UserError

PLAN_FORMAT = "onnxprune-plan"
PLAN_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: before ``provenance``; 2: before ``coupled``


@dataclass(frozen=True)
class LayerPlan:
    """One pruned Conv's decisions. Frozen: a stage that decides something new about a layer
    (calibration's data-aware kept channels, ``--plan-in``'s provenance) returns a new
    ``LayerPlan`` (``dataclasses.replace``) instead of editing this one, so a plan someone holds
    keeps meaning what its stage decided. Shallow: the lists and dicts are not copied, and no
    stage may edit them in place either."""

    node: str
    weight: str
    c_out: int
    c_in: int
    kernel: list[int]
    groups: int
    filter_order: list[int]
    kept_in_channels: list[list[int]]
    clustering_method: str = "none"
    criterion: str = "none"
    scores: dict = field(default_factory=dict)
    # {"structure": who chose groups and kept count, "channels": who chose the kept channels,
    #  "kept_fraction": kept channels per group / C_in}; see provenance_of and the stages that set it
    provenance: dict = field(default_factory=dict)

    @property
    def filters_per_group(self) -> int:
        return self.c_out // self.groups

    @property
    def kept_per_group(self) -> int:
        return len(self.kept_in_channels[0])

    def group_of_filter(self) -> np.ndarray:
        """Original filter index -> its group."""
        group = np.empty(self.c_out, dtype=np.int64)
        group[np.asarray(self.filter_order)] = np.arange(self.c_out) // self.filters_per_group
        return group

    def kernel_mask(self) -> np.ndarray:
        """Boolean [c_out, c_in]: True where the grouped kernel of (filter, channel) is kept."""
        mask = np.zeros((self.c_out, self.c_in), dtype=bool)
        for f, g in enumerate(self.group_of_filter()):
            mask[f, self.kept_in_channels[g]] = True
        return mask

    def validate(self) -> None:
        where = f"plan layer {self.node!r}"
        if self.c_out < 1 or self.c_in < 1:
            raise UserError(f"{where}: c_out and c_in must be positive, got {self.c_out} and {self.c_in}")
        if self.groups < 1 or self.c_out % self.groups:
            raise UserError(f"{where}: groups={self.groups} does not divide c_out={self.c_out}")
        if sorted(self.filter_order) != list(range(self.c_out)):
            raise UserError(f"{where}: filter_order is not a permutation of 0..{self.c_out - 1}")
        if len(self.kept_in_channels) != self.groups:
            raise UserError(f"{where}: {len(self.kept_in_channels)} kept-channel lists for {self.groups} groups")
        sizes = {len(k) for k in self.kept_in_channels}
        if len(sizes) != 1 or 0 in sizes:
            raise UserError(f"{where}: every group must keep the same, non-zero number of input channels")
        for kept in self.kept_in_channels:
            if kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.c_in:
                raise UserError(f"{where}: kept_in_channels must be sorted distinct indices in 0..{self.c_in - 1}")


@dataclass
class Plan:
    layers: list[LayerPlan]
    skipped: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    coupled: list[dict] = field(default_factory=list)  # {"members": [[tensor, offset], ...], "width", "kept"}

    def by_node(self) -> dict[str, LayerPlan]:
        return {layer.node: layer for layer in self.layers}

    def to_json(self) -> str:
        data = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "options": self.options,
                "layers": [asdict(layer) for layer in self.layers], "skipped": self.skipped,
                "coupled": self.coupled}
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise UserError(f"not an onnxprune plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") not in READABLE_VERSIONS:
            raise UserError(f"plan version {data.get('version')} is not supported (expected one of "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
        _check_type("plan", "layers", data.get("layers"), _is_list_of(_is(dict)), "a list of layer objects")
        _check_type("plan", "skipped", data.get("skipped", []), _is_list_of(_is(dict)), "a list of objects")
        _check_type("plan", "options", data.get("options", {}), _is(dict), "an object")
        for layer in data["layers"]:
            _check_layer_fields(layer)
        for entry in data.get("skipped", []):
            for key in ("node", "reason"):
                _check_type("plan skipped entry", key, entry.get(key), _is(str), "a string")
        _check_type("plan", "coupled", data.get("coupled", []), _is_list_of(_is(dict)), "a list of objects")
        for group in data.get("coupled", []):
            _check_coupled_group(group)
        recorded = Counter(json.dumps(group["members"]) for group in data.get("coupled", []))
        if any(n > 1 for n in recorded.values()):
            raise UserError("plan records a coupled channel group twice")
        plan = cls(layers=[LayerPlan(**layer) for layer in data["layers"]],
                   skipped=list(data.get("skipped", [])), options=dict(data.get("options", {})),
                   coupled=[dict(group) for group in data.get("coupled", [])])
        for layer in plan.layers:
            layer.validate()
        repeated = sorted(name for name, n in Counter(layer.node for layer in plan.layers).items() if n > 1)
        if repeated:
            raise UserError(f"plan lists Conv {', '.join(map(repr, repeated))} more than once")
        return plan


def _is(kind):
    return lambda value: isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _is_list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


_INTS = _is_list_of(_is(int))
# LayerPlan field -> (check, what the JSON value must be)
_LAYER_FIELDS = {
    "node": (_is(str), "a string"), "weight": (_is(str), "a string"),
    "c_out": (_is(int), "an integer"), "c_in": (_is(int), "an integer"),
    "kernel": (lambda v: _INTS(v) and len(v) == 2, "a list of 2 integers"),
    "groups": (_is(int), "an integer"), "filter_order": (_INTS, "a list of integers"),
    "kept_in_channels": (_is_list_of(_INTS), "a list of integer lists"),
    "clustering_method": (_is(str), "a string"), "criterion": (_is(str), "a string"),
    "scores": (_is(dict), "an object"), "provenance": (_is(dict), "an object"),
}
_OPTIONAL = {"clustering_method", "criterion", "scores", "provenance"}


def _check_layer_fields(layer: dict) -> None:
    where = f"plan layer {layer.get('node')!r}" if isinstance(layer.get("node"), str) else "plan layer"
    unknown = sorted(set(layer) - set(_LAYER_FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for key, (check, what) in _LAYER_FIELDS.items():
        if key in layer:
            _check_type(where, key, layer[key], check, what)
        elif key not in _OPTIONAL:
            raise UserError(f"{where}: field {key!r} is missing")


def _check_coupled_group(group: dict) -> None:
    members = group.get("members")
    if not (isinstance(members, list) and members and all(
            isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and type(m[1]) is int and m[1] >= 0
            for m in members)):
        raise UserError("plan coupled group: 'members' must be a non-empty list of [tensor name, channel offset]")
    width, kept = group.get("width"), group.get("kept")
    if type(width) is not int or width < 1:
        raise UserError("plan coupled group: 'width' must be a positive integer")
    if not (isinstance(kept, list) and kept and all(type(k) is int for k in kept)
            and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < width and len(kept) < width):
        raise UserError(f"plan coupled group at {members[0][0]!r}: 'kept' must be sorted, distinct channels in "
                        f"[0, {width}), fewer than the width")


def _check_type(where: str, key: str, value, check, what: str) -> None:
    if not check(value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(f"{where}: {key!r} must be {what}, got {shown}")
