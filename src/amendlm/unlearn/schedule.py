"""Dynamic dataset swapping of BiasUnlearn as pure functions (DESIGN.md §4).

Every evaluation measures SS per bias type on the *val* targets; ``gap_c = |SS_c - 50|``.

* **stop** when every gap is below ``tolerance`` (2 points);
* else **focus** on the worst category (largest gap; ties broken by name);
* if its SS is below 50 the bias has reversed: **swap** roles for that category (anti-stereotype
  becomes the forget side) — and swap back once it is above 50 again;
* with ``type_focus="all"`` (:func:`types_to_train`) every type outside the tolerance is trained
  at once instead, each one swapped whose SS is below 50;
* the worst gap picks a **phase**: its learning-rate scale, linear-scheduler horizon and the
  steps until the next evaluation (official: gap > 5 -> lr, 1000 steps, eval every 80;
  3-5 -> 0.8 lr, 200, every 50; <= 3 -> 0.8 lr, 200, every 30).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Phase:
    """One row of the swap schedule, used while the worst gap is above ``min_gap``."""

    min_gap: float  # applies when worst gap > min_gap (the last phase should have 0)
    lr_scale: float  # multiplies the configured learning rate
    scheduler_steps: int  # horizon of the linear decay restarted at this evaluation
    eval_every: int  # optimizer steps until the next evaluation


DEFAULT_TOLERANCE = 2.0  # the stop rule's default: every val |SS - 50| below it (UnlearnConfig.tolerance)

OFFICIAL_PHASES: tuple[Phase, ...] = (
    Phase(5.0, 1.0, 1000, 80),
    Phase(3.0, 0.8, 200, 50),
    Phase(0.0, 0.8, 200, 30),
)


@dataclass(frozen=True)
class SwapDecision:
    """What to do after one evaluation (all fields are data; nothing parses printed text)."""

    stop: bool
    focus: str | None  # worst category, None when stopping
    swap: bool  # True: forget the anti-stereotype of ``focus`` (its SS < 50)
    gap: float  # worst |SS - 50|
    phase: Phase | None


def scaled_phases(phases: Sequence[Phase], scale: float) -> tuple[Phase, ...]:
    """Multiply every step count by ``scale`` (at least 1 step), e.g. for short budgets.

    Raises:
        ValueError: ``scale`` is not a finite number > 0 (a config's ``schedule_scale`` is checked,
            naming the field, when the config is built: :mod:`amendlm.unlearn.config_checks`).
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scaled_phases: scale must be a finite number > 0, got {scale}")
    return tuple(
        Phase(p.min_gap, p.lr_scale, max(1, round(p.scheduler_steps * scale)), max(1, round(p.eval_every * scale)))
        for p in phases
    )


def pick_phase(gap: float, phases: Sequence[Phase] = OFFICIAL_PHASES) -> Phase:
    """The first phase whose ``min_gap`` the gap exceeds (the last phase otherwise)."""
    if not phases:
        raise ValueError("the swap schedule needs at least one phase")
    for phase in phases:
        if gap > phase.min_gap:
            return phase
    return phases[-1]


def decide(
    ss_by_type: Mapping[str, float], tolerance: float = DEFAULT_TOLERANCE, phases: Sequence[Phase] = OFFICIAL_PHASES
) -> SwapDecision:
    """Apply the stop rule and choose the next focus category, swap flag and phase.

    Args:
        ss_by_type: val-split SS (percent) per bias type, e.g. ``{"gender": 61.0, "race": 48.5}``.
        tolerance: stop when every ``|SS - 50| < tolerance``.
        phases: the schedule (:data:`OFFICIAL_PHASES` or :func:`scaled_phases`).

    Raises:
        ValueError: no bias types.
    """
    if not ss_by_type:
        raise ValueError("decide() needs SS for at least one bias type")
    gaps = {name: abs(ss - 50.0) for name, ss in ss_by_type.items()}
    worst = max(sorted(gaps), key=lambda name: gaps[name])
    gap = gaps[worst]
    if all(g < tolerance for g in gaps.values()):
        return SwapDecision(stop=True, focus=None, swap=False, gap=gap, phase=None)
    return SwapDecision(stop=False, focus=worst, swap=ss_by_type[worst] < 50.0, gap=gap, phase=pick_phase(gap, phases))


def types_to_train(ss_by_type: Mapping[str, float], tolerance: float = DEFAULT_TOLERANCE,
                   rest_within: float | None = None) -> tuple[list[str], list[str]]:
    """``type_focus="all"``: the bias types to train and, among them, those whose roles are swapped.

    Args:
        ss_by_type: val-split SS (percent) per bias type.
        tolerance: a type with ``|SS - 50| < tolerance`` is left out.
        rest_within: a type with ``|SS - 50| < rest_within`` also rests, unless that would leave no
            type to train (then every type outside the tolerance is trained); None: no resting.

    Returns:
        ``(active, swapped)``: the types trained (sorted by name), and those of them with SS below 50
        (their anti-stereotypes become the rejected / forget side).
    """
    active = sorted(name for name, ss in ss_by_type.items() if abs(ss - 50.0) >= tolerance)
    if rest_within is not None:
        far = [name for name in active if abs(ss_by_type[name] - 50.0) >= rest_within]
        active = far or active
    return active, [name for name in active if ss_by_type[name] < 50.0]
