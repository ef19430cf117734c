"""Fidelity-aware ``--groups auto``: measure sensitivities once, then plan any target from them.

Why one object: the fidelity budget (``--min-agreement``) tries several MACs targets; each needs
the same layer shapes, cost model, candidate cuts and measured sensitivities, which take a
minute to build on a real ImageNet net and milliseconds to re-plan from.

The per-layer decisions come out in the speed planner's form (``SpeedPlan.configs``), so the
rest of the pipeline (``plan_model``, calibration, rewrite, verification) is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from .allocate import (Allocation, allocate, candidate_widths, candidates, speed_plan_of, speed_weight,
                       speed_weighted)
from .latency import load_cost_model, profile
from .sensitivity import SensitivityReport, measure, weight_proxy
from .speed_plan import MACS_TOLERANCE, SpeedPlan, _check_targets, _macs_target, _Planner, collect_layers


class FidelityPlanner:
    """Sensitivity-measured candidate cuts of one (normalized) model on one provider."""

    def __init__(self, model, config, feeds: dict | None = None, progress=None, sensitivity=None,
                 coupled_also_in=None):
        """``sensitivity``: curves already measured on a model whose Convs have the same inputs
        (the dense model, for the rest of a coupled plan); ``coupled_also_in``: with it, the coupled
        channel groups are candidates too (``--coupled-rate auto``), found identically in these
        other versions of the model (``coupled.eligible``)."""
        _check_targets(config)
        self.config = config
        self.cost = load_cost_model(config.provider, config.latency_table)
        self.prof = profile(config.provider)
        self.eligible = None
        if coupled_also_in is not None:
            from ..channels.coupled import eligible

            self.eligible = eligible(model, self.prof.align, config.exclude, coupled_also_in)
            writers = {name for group in self.eligible.candidates for name in group.producers}
            config = replace(config, g1_only=tuple(sorted(set(config.g1_only) | writers)))
        layers, self.skipped, other_macs = collect_layers(model, config)
        self.layers = layers
        self.planner = _Planner(layers, self.cost, self.prof, other_macs)
        self.dense = self.planner.evaluate(0.0, {})
        self._model, self._feeds, self._progress = model, feeds, progress
        self._sensitivity: SensitivityReport | None = sensitivity
        self._table = None
        self._groups = None

    @property
    def sensitivity(self) -> SensitivityReport:
        """Measured (or proxy) cost curves, computed on first use: a target of 1.0 needs none."""
        if self._sensitivity is None:
            widths = {name: candidate_widths(self.layers[name].c_in, self.prof.align) for name in self.planner.order}
            widths = {name: w for name, w in widths.items() if w}
            if self._feeds:
                self._sensitivity = measure(self._model, self._feeds, widths, self._progress)
            else:
                self._sensitivity = weight_proxy(self._model, widths)
        return self._sensitivity

    def sensitivity_report(self) -> dict | None:
        """The cost curves as JSON data, or None when no plan needed them."""
        return None if self._sensitivity is None else self._sensitivity.as_dict()

    @property
    def table(self):
        if self._table is None:
            self._table = candidates(self.planner, self.sensitivity)
        return self._table

    @property
    def groups(self) -> list:
        """The coupled groups' candidate cuts (none unless built with ``coupled_also_in``)."""
        if self._groups is None:
            self._groups = []
            if self.eligible is not None:
                from ..channels.coupled_candidates import group_candidates

                groups = group_candidates(self._model, self.layers, self.cost, self.prof.align, self._feeds,
                                          self.eligible)
                weight = speed_weight(self.sensitivity)
                if weight:  # the single-Conv candidates' rule (allocate.speed_weight)
                    per_mac = self.dense.time_us / max(self.dense.macs, 1)
                    groups = [replace(g, cuts=tuple(
                        replace(c, cost=speed_weighted(c.cost, c.saving_us, c.saving_macs, per_mac, weight))
                        for c in g.cuts)) for g in groups]
                self._groups = groups
        return self._groups

    def _planner_for(self, chosen: list) -> _Planner:
        """The planner of the model with the ``chosen`` group cuts applied (writers, depthwise
        Convs on the groups and readers narrowed; Gemm readers' MACs out of the rest)."""
        from ..channels.coupled_candidates import gemm_saving, narrowed_layers

        return _Planner(narrowed_layers(self.layers, chosen), self.cost, self.prof,
                        self.planner.other_macs - gemm_saving(chosen))

    @property
    def offered(self) -> list:
        """The groups' candidate cuts if a plan asked for them (the report's), else none."""
        return self._groups or []

    @property
    def measured(self) -> bool:
        return bool(self._feeds)

    def default_target(self) -> float | None:
        """The MACs fraction the options ask for (``--target-macs``, else what ``--rate`` leaves)."""
        return _macs_target(self.layers, self.config, self.dense.macs, self.planner.other_macs)

    def plan(self, macs_target: float | None = None, speedup: float | None = None) -> tuple[SpeedPlan, Allocation]:
        """Least-fidelity-cost plan keeping at most ``macs_target`` of the MACs (or reaching ``speedup``)."""
        if macs_target is not None:
            if macs_target >= 1.0:
                allocation = Allocation({}, self.dense, 0.0)
            else:
                allocation = allocate(self.planner, self.table, self.dense,
                                      macs_limit=(macs_target + MACS_TOLERANCE) * self.dense.macs,
                                      groups=self.groups, planner_for=self._planner_for)
        elif speedup is not None:
            allocation = allocate(self.planner, self.table, self.dense, time_limit=self.dense.time_us / speedup,
                                  groups=self.groups, planner_for=self._planner_for)
        else:
            raise ValueError("plan needs a MACs target or a speedup")
        plan = speed_plan_of(allocation, self.planner, self.dense, self.skipped,
                             getattr(self.cost, "source", "custom"), self.config.provider)
        if not self.measured:
            plan.notes.append("fidelity unmeasured (no --calib): cuts ranked by a data-free weight-norm proxy")
        return plan, allocation
