"""The state of an unlearning run besides weights and optimizer, its outcome, and its learning rate.

:class:`TrainState` is saved as ``checkpoint/state.json`` (a resumed run needs nothing else);
:class:`TrainResult` is what :func:`amendlm.unlearn.trainer.train` returns (and ``summary.json``
holds); :func:`learning_rate` is the rate of one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amendlm.unlearn.config import UnlearnConfig


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs (saved as JSON)."""

    step: int = 0
    focus: str | None = None  # bias type the forget/retain streams are restricted to
    swap: bool = False  # roles of ``focus`` swapped (its SS < 50)
    # type_focus="all": the bias types trained (outside the tolerance and, with rest_within, far enough; empty = every
    # type) and those swapped
    active_types: list = field(default_factory=list)
    swapped_types: list = field(default_factory=list)
    next_eval: int = 0
    phase_start: int = 0  # step at which the linear decay (re)started
    phase_steps: int = 1  # its horizon
    lr_scale: float = 1.0
    best_gap: float | None = None  # the evaluation kept by ``selection``
    best_step: int | None = None
    best_lms_drop: float | None = None
    gap_best_gap: float | None = None  # the smallest worst gap, LMS aside
    gap_best_step: int | None = None
    gap_best_lms_drop: float | None = None
    base_lms: float | None = None  # overall val LMS of the first evaluation (step 0)
    status: str = "running"
    samplers: dict = field(default_factory=dict)  # StreamSamplers.state_dict(): every (stream, focus, swap) visited
    reference_cache: list = field(default_factory=list)  # ReferenceCache.state_dict() (packing): [[key, logp], ...]
    # wall-clock training seconds up to this checkpoint, summed over the run's resumed parts; False when a part
    # resumed from a checkpoint that predates this field (its earlier parts then count 0)
    seconds: float = 0.0
    seconds_complete: bool = True

    @property
    def swapped(self) -> bool:
        """Whether the current phase forgets the anti-stereotypes of ``focus`` (a focus with its roles swapped)."""
        return bool(self.focus and self.swap)

    @property
    def trained_types(self) -> list[str] | None:
        """The bias types the forget / retain / pair streams hold: ``[focus]``, the active types of
        ``type_focus="all"``, or None (every type)."""
        return [self.focus] if self.focus else (list(self.active_types) or None)

    @property
    def swapped_type_names(self) -> list[str]:
        """The bias types whose roles are exchanged in the current phase."""
        return [self.focus] if self.swapped else list(self.swapped_types)


def learning_rate(config: UnlearnConfig, state: TrainState, step: int) -> float:
    """Linear warm-up, then linear decay to 0 over the current phase's horizon.

    ``lr * lr_scale * warm * max(0, 1 - (step - phase_start) / phase_steps)``; ``warm`` ramps
    over the run's first ``warmup_steps`` and again over ``phase_warmup_steps`` after the start
    of every later phase (``phase_start > 0``).
    """
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    if config.phase_warmup_steps and state.phase_start > 0:
        warm *= min(1.0, (step - state.phase_start + 1) / config.phase_warmup_steps)
    decay = max(0.0, 1.0 - (step - state.phase_start) / max(1, state.phase_steps))
    return config.lr * state.lr_scale * warm * decay


@dataclass
class TrainResult:
    """Outcome of :func:`train` (also written to ``summary.json``)."""

    status: str  # completed | stopped (stop rule met) | nan | interrupted
    steps: int
    out: str
    best_step: int | None
    last_val: dict | None  # val scores per bias type of the last evaluation
    seconds: float  # wall-clock training seconds of the whole run, summed over its resumed parts
    seconds_this_run: float | None = None  # those of this invocation alone (None: not recorded)
    seconds_complete: bool = True  # False: a part resumed from a checkpoint without seconds, counted as 0
