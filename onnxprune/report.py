"""The JSON report of a run: what ``prune()`` returns beside the model, and how its core is built.

Why apart from ``pipeline.py``: the report is the contract with its readers (the command's
summary and markdown, CI gates, the benchmarks, people): its fields are made here, from the
models and the plan, and the pipeline only adds each stage's own section
(auto, sensitivity, budget, calibration, distill, speed, accuracy, gates, timings).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import __version__
from .ir.macs import count_macs, count_params
from .planning.plan import Plan


@dataclass
class Report:
    """What a run did: ``data`` is the JSON report, ``plan`` the decisions that were applied."""

    data: dict
    plan: Plan

    def __getitem__(self, key):
        return self.data[key]

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1) + "\n"


def build_report(original, normalized, pruned, plan: Plan, verified, config, shapes=None) -> dict:
    """The report's core: options (``config``, a ``pipeline.PruneConfig`` as the user gave it), MACs
    and params before and after, and one entry per Conv (pruned or skipped, in graph order) with
    its provenance."""
    macs_before, per_node_before = count_macs(normalized, shapes)
    macs_after, per_node_after = count_macs(pruned, shapes)
    layers = []
    pruned_before = pruned_after = 0
    for layer in plan.layers:
        before, after = per_node_before.get(layer.node, 0), per_node_after.get(layer.node, 0)
        pruned_before += before
        pruned_after += after
        layers.append({"name": layer.node, "c_out": layer.c_out, "c_in": layer.c_in, "kernel": layer.kernel,
                       "groups": layer.groups, "kept_in_channels_per_group": layer.kept_per_group,
                       "clustering_method": layer.clustering_method, "criterion": layer.criterion,
                       "macs_before": before, "macs_after": after, "provenance": layer.provenance})
    layers += [{"name": s["node"], "skipped": s["reason"]} for s in plan.skipped]
    order = {n.name: i for i, n in enumerate(normalized.graph.node)}
    layers.sort(key=lambda entry: order.get(entry["name"], len(order)))
    return {
        "onnxprune_version": __version__,
        "options": recorded_options(config),
        "macs_before": macs_before, "macs_after": macs_after,
        "params_before": count_params(normalized), "params_after": count_params(pruned),
        "params_before_normalization": count_params(original),
        "pruned_layers_macs_before": pruned_before, "pruned_layers_macs_after": pruned_after,
        "convs_pruned": len(plan.layers), "convs_skipped": len(plan.skipped),
        "input_shapes": {name: {"dims": list(shape.dims), "source": shape.source}
                         for name, shape in (shapes or {}).items()},
        "layers": layers,
        "verify": verified.as_dict() if verified else None,
    }


INTERNAL_OPTIONS = ("g1_only", "fixed_channels")  # set by the pass itself, not by the user


def recorded_options(config) -> dict:
    """Every option the run was given, JSON-safe, in ``PruneConfig``'s order: data is named, not
    copied (a path as given; in-memory arrays as ``"<arrays>"``), ``tickets`` is their count and
    ``plan_in`` whether a plan was given. Why all of them: a report that showed ``rate 0.4375``
    for a ``--target-macs 0.7`` run, without provider, precision or coupled rate, could not say
    how its output was made."""
    import dataclasses

    options = {}
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if spec.name in INTERNAL_OPTIONS:
            continue
        if spec.name == "tickets":
            options["tickets"] = len(value)
        elif spec.name == "plan":
            options["plan_in"] = value is not None
        else:
            options[spec.name] = _plain(value)
    return options


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "shape") and getattr(value, "shape") == () and hasattr(value, "item"):
        return value.item()  # a numpy scalar (a seed given as np.int64)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        if any(hasattr(v, "shape") for v in value.values()):
            return "<arrays>"
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape"):
        return "<arrays>"
    return f"<{type(value).__name__}>"

