"""The fidelity budget's options (``--min-agreement``): its default and when it is searched.

Why apart from ``pipeline``: the command checks a given value before any work, the pipeline
resolves it once, and the search itself is ``budget.py``; one place says what the value means.
"""

from __future__ import annotations

from ..errors import UserError


# 0.97: on the Fashion-MNIST ResNets 96% test agreement meant -1.5 points of accuracy, 97-98% under 1
DEFAULT_MIN_AGREEMENT = 0.97
BUDGET_HOLDOUT_DIVISOR = 4  # with a fidelity budget, 1/4 of the calibration inputs is held out (else 1/8)


def check_agreement(value: float) -> float:
    """A fidelity budget is a fraction in (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise UserError(f"--min-agreement is a fraction in (0, 1], got {value}")
    return value


def resolve_min_agreement(config) -> float | None:
    """The fidelity budget the planner searches for: an explicit ``min_agreement``; with ``"auto"``
    (the default) ``DEFAULT_MIN_AGREEMENT`` when calibration data is given and no explicit
    MACs/speed target is (an explicit target is the user's choice and is kept); else none.

    Where the structure is not the fidelity planner's to choose (``--groups N``, ``--plan-in``,
    ``--planner speed``, ``--coupled-rate R``: its cut is fixed before the planner runs) an explicit
    value is not searched for: it is only the CI gate (``gate.py``) on the result."""
    if config.planner not in ("fidelity", "speed"):
        raise UserError(f"--planner must be 'fidelity' or 'speed', got {config.planner!r}")
    value = config.min_agreement
    fidelity_auto = config.plan is None and config.planner == "fidelity" and config.coupled_rate in (None, "auto") and (
        config.groups == "auto" or config.target_macs is not None or config.target_speedup is not None)
    if value == "auto":
        explicit = config.target_macs is not None or config.target_speedup is not None
        return DEFAULT_MIN_AGREEMENT if fidelity_auto and config.calib is not None and not explicit else None
    if value is None:
        return None
    value = check_agreement(float(value))
    if config.calib is None:
        raise UserError("--min-agreement needs --calib (agreement is measured on held-out calibration inputs)")
    return value if fidelity_auto else None
