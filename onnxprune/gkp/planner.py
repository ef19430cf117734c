"""Decide, per prunable Conv, the filter groups and the grouped kernels each group keeps.

Steps per layer (the paper's steps 1–3, see README "How it works"):
1. cluster the filters into G equal-size groups with every candidate method;
2. pick one candidate by the tickets-magnitude-increase rule over the training snapshots, or by
   the data-free magnitude fallback when there are none (or ``criterion="magnitude"``);
3. inside each group keep ``n_kept(C_in, rate)`` input channels by the greedy grouped-kernel
   cost.
The result is a ``Plan`` (plain data); nothing here touches the graph.
"""

from __future__ import annotations

import multiprocessing as mp
import numbers
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from . import clustering, kernel_selection, partition, tmi
from ..ir.analysis import ConvInfo, SkippedConv, conv_nodes, find_prunable_convs
from ..errors import UserError
from ..ir.graph import GraphIndex
from ..planning.plan import LayerPlan, Plan


# The greedy search tries every input channel as a start (the paper's rule, which only prunes
# 3×3 convs of at most 512 channels) up to EXHAUSTIVE_GREEDY_UP_TO channels; wider layers (1×1
# convs over 1024–2048 channels, 10+ s per group with every start) use MAX_GREEDY_STARTS evenly
# spaced starts.
EXHAUSTIVE_GREEDY_UP_TO = 512
MAX_GREEDY_STARTS = 128
# Models with at least this many prunable weights are planned in worker processes (one per
# core): a ResNet-50 plan is a minute of CPU, a CIFAR ResNet a second, not worth the start-up.
PARALLEL_MIN_WEIGHTS = 2_000_000


@dataclass
class PlanOptions:
    rate: float = 0.4375
    groups: int | str = 8  # an int for every layer, or "auto" (per-layer choice, see layer_configs)
    criterion: str = "tmi"  # "tmi" (falls back to magnitude without snapshots) or "magnitude"
    seed: int = 0
    min_channels: int = 16
    exclude: tuple[str, ...] = ()
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(clustering.CLUSTERING_METHODS))
    # Per-layer overrides (from the speed-aware planner): node -> {"groups": G, "n_keep": n}
    # or {"skip": reason}. Convs not listed follow ``groups`` and ``rate``.
    layer_configs: dict[str, dict] | None = None

    def check(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise UserError(f"--rate must be in [0, 1), got {self.rate}")
        if self.groups != "auto" and (not isinstance(self.groups, int) or self.groups < 1):
            raise UserError(f"--groups must be a positive integer or 'auto', got {self.groups}")
        if self.criterion not in ("tmi", "magnitude"):
            raise UserError(f"--criterion must be 'tmi' or 'magnitude', got {self.criterion!r}")
        if self.min_channels < 1:
            raise UserError(f"--min-channels must be >= 1, got {self.min_channels}")
        # The clusterings seed numpy / scikit-learn generators, which take 0 <= seed < 2**32.
        if isinstance(self.seed, (bool, np.bool_)) or not isinstance(self.seed, numbers.Integral) \
                or not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be an integer in 0..{2**32 - 1}, got {self.seed!r}")


def plan_model(model: onnx.ModelProto, options: PlanOptions, snapshots=(),
               progress: Callable[[int, int, str], None] | None = None) -> Plan:
    """Plan grouped kernel pruning for ``model`` (normalized); ``snapshots`` are normalized too."""
    options.check()
    configs = options.layer_configs or {}
    if options.groups == "auto" and options.layer_configs is None:
        raise ValueError("groups='auto' needs layer_configs from the speed-aware planner")
    prunable, skipped = find_prunable_convs(model, lambda info: _layer_groups(info, options), options.min_channels,
                                            options.exclude)
    skipped += [SkippedConv(info.name, configs[info.name]["skip"]) for info in prunable
                if "skip" in configs.get(info.name, {})]
    prunable = [info for info in prunable if "skip" not in configs.get(info.name, {})]
    index = GraphIndex(model.graph)
    use_tickets = options.criterion == "tmi" and len(snapshots) > 0
    snapshot_weights = [match_snapshot_weights(model, prunable, snap, i) for i, snap in enumerate(snapshots)] \
        if use_tickets else []
    jobs = [(info, index.constant(info.weight), [weights[info.name] for weights in snapshot_weights])
            for info in prunable]
    layers = _plan_layers(jobs, options, progress)
    return Plan(layers=layers, skipped=[{"node": s.name, "reason": s.reason} for s in skipped],
                options={"rate": options.rate, "groups": options.groups, "criterion": options.criterion,
                         "seed": options.seed, "min_channels": options.min_channels,
                         "tickets": len(snapshots)})


def _plan_layers(jobs: list, options: PlanOptions, progress) -> list[LayerPlan]:
    """``plan_layer`` for every job, in order; big models spread the layers over processes.

    Layers are planned independently (each is seeded by ``options.seed`` alone), so the plan is
    the same whichever process computes a layer.
    """
    progress = progress or (lambda done, total, name: None)
    total_weights = sum(weight.size for _, weight, _ in jobs)
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers < 2 or total_weights < PARALLEL_MIN_WEIGHTS or "fork" not in mp.get_all_start_methods():
        layers = []
        for i, (info, weight, snaps) in enumerate(jobs):
            progress(i, len(jobs), info.name)
            layers.append(plan_layer(info, weight, options, snaps))
    else:
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_ignore_sigint)
        try:
            futures = [pool.submit(plan_layer, info, weight, options, snaps) for info, weight, snaps in jobs]
            layers = []
            for i, ((info, _, _), future) in enumerate(zip(jobs, futures)):
                progress(i, len(jobs), info.name)
                layers.append(future.result())
        except BaseException:
            _abandon(pool)
            raise
        pool.shutdown()
    progress(len(jobs), len(jobs), "")
    return layers


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group, but only the parent handles it
    (otherwise every worker prints a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _abandon(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` without waiting (on Ctrl-C or an error in the parent): cancel the queued
    layers and end the workers, whose results nobody will read. ``shutdown(wait=True)`` (what a
    ``with`` block does) would first plan every queued layer: seconds to minutes."""
    # Workers still run the layers already handed to them, and at exit the interpreter waits for
    # those; there is no public way to stop them before Python 3.14 (terminate_workers). shutdown
    # forgets the processes, so they are listed first.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()


def _layer_groups(info: ConvInfo, options: PlanOptions) -> int:
    config = (options.layer_configs or {}).get(info.name, {})
    if "skip" in config:
        return 1
    if "groups" in config:
        return int(config["groups"])
    if options.groups == "auto":
        raise ValueError(f"groups='auto' but no layer config for {info.name}")
    return int(options.groups)


def _layer_n_keep(info: ConvInfo, options: PlanOptions) -> int:
    config = (options.layer_configs or {}).get(info.name, {})
    if "n_keep" in config:
        return int(config["n_keep"])
    return kernel_selection.n_kept(info.c_in, options.rate)


def plan_layer(info: ConvInfo, weight: np.ndarray, options: PlanOptions, snapshots: list[np.ndarray]) -> LayerPlan:
    groups = _layer_groups(info, options)
    w = weight.astype(np.float64)
    if groups == 1:
        labels, method, criterion, scores = np.zeros(info.c_out, dtype=np.int64), "none", "none", {}
    else:
        candidates = {m: clustering.cluster_filters(w, groups, m, seed=options.seed) for m in options.methods}
        method, scores = tmi.choose_clustering(candidates, w, snapshots, groups)
        labels = candidates[method]
        criterion = scores.get("criterion", "tmi" if snapshots else "magnitude")
    n_keep = _layer_n_keep(info, options)
    filter_order = [int(r) for g in range(groups) for r in np.flatnonzero(labels == g)]
    if (options.layer_configs or {}).get(info.name, {}).get("disjoint"):
        if groups * n_keep != info.c_in:
            raise ValueError(f"{info.name}: disjoint groups need groups*n_keep == C_in")
        kept = partition.partition_input_channels(w, labels, groups)
        scores = {**scores, "kernel_selection": "disjoint-energy"}
    else:
        kept = []
        for g in range(groups):
            rows = np.flatnonzero(labels == g)
            if n_keep == info.c_in:
                kept.append(list(range(info.c_in)))
            else:
                starts = None if info.c_in <= EXHAUSTIVE_GREEDY_UP_TO else MAX_GREEDY_STARTS
                chosen = kernel_selection.select_grouped_kernels(w[rows], n_keep, max_starts=starts)
                kept.append([int(c) for c in chosen])
    config = (options.layer_configs or {}).get(info.name)
    if config is not None:
        structure = str(config.get("source", "speed-aware planner"))
    else:
        structure = f"--groups {groups} --rate {options.rate:g} (the paper's rule, the same for every layer)"
    if n_keep == info.c_in:
        channels = "all kept"
    elif scores.get("kernel_selection") == "disjoint-energy":
        channels = "weights: disjoint partition by kernel energy"
    else:
        channels = "weights: the paper's greedy grouped-kernel cost"
    return LayerPlan(node=info.name, weight=info.weight, c_out=info.c_out, c_in=info.c_in,
                     kernel=list(info.kernel), groups=groups, filter_order=filter_order,
                     kept_in_channels=kept, clustering_method=method, criterion=criterion, scores=scores,
                     provenance={"structure": structure, "channels": channels,
                                 "kept_fraction": round(n_keep / info.c_in, 4)})


def match_snapshot_weights(model: onnx.ModelProto, prunable: list[ConvInfo], snapshot: onnx.ModelProto,
                           number: int) -> dict[str, np.ndarray]:
    """Weights of ``snapshot`` for each prunable Conv: by initializer name, else by Conv order.

    Shapes must agree; a snapshot of another architecture is an error, not a silent mismatch.
    """
    snap_index = GraphIndex(snapshot.graph)
    model_convs = [n.name for n in conv_nodes(model.graph)]
    snap_convs = conv_nodes(snapshot.graph)
    matched = {}
    for info in prunable:
        value = snap_index.constant(info.weight)
        if value is None:
            position = model_convs.index(info.name)
            if position < len(snap_convs) and len(snap_convs[position].input) > 1:
                value = snap_index.constant(snap_convs[position].input[1])
        if value is None or value.shape != (info.c_out, info.c_in, *info.kernel):
            got = None if value is None else tuple(value.shape)
            raise UserError(f"ticket snapshot #{number + 1} does not match the model at Conv {info.name!r} "
                            f"(weight {info.weight!r}: expected shape {(info.c_out, info.c_in, *info.kernel)}, "
                            f"found {got}); snapshots must be exports of the same architecture")
        matched[info.name] = value.astype(np.float64)
    return matched
