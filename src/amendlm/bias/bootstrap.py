"""95 % bootstrap confidence intervals and a paired before/after test (pure; NumPy only).

The unit of resampling is the **target term** for StereoSet (its SS and LMS are macro averages
over target terms, DESIGN.md §3, so terms are the independent draws) and the **pair** for
CrowS-Pairs.  Two runs evaluated on the same terms are compared *paired*: each bootstrap draw
picks one multiset of terms and scores both runs on it.

Per-unit records come from ``amendlm eval`` (``benchmarks.stereoset.per_target`` and
``benchmarks.crows-pairs.per_pair``); :func:`stereoset_units` / :func:`crows_units` read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_RESAMPLES = 2000  # percentiles of 2,000 draws: the 2.5/97.5 % quantiles move by < 0.1 point here
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval (same units as the estimate)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """``after - before`` on the same units: the estimate, its interval and a two-sided p-value.

    ``p`` is the two-sided bootstrap p-value ``min(1, 2 · (k + 1) / (B + 1))``, ``k`` the number of
    the ``B`` draws ``d`` on the far side of zero (``min(#[d ≤ 0], #[d ≥ 0])``); with few units (16
    test target terms) read it as approximate.
    """

    value: float
    low: float
    high: float
    p: float
    n_units: int

    def to_dict(self) -> dict:
        return asdict(self)


def _draws(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_units) indices drawn with replacement."""
    if n_units < 1:
        raise ValueError("bootstrap needs at least one unit")
    return np.random.default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))


def _bounds(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def mean_interval(values, n_resamples: int = N_RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """Mean of ``values`` (shape (n_units,)) with its percentile-bootstrap interval.

    Raises:
        ValueError: no values.
    """
    values = np.asarray(values, dtype=np.float64)
    draws = values[_draws(len(values), n_resamples, seed)].mean(axis=1)
    return Interval(float(values.mean()), *_bounds(draws, level))


def paired_difference(before, after, n_resamples: int = N_RESAMPLES, level: float = LEVEL,
                      seed: int = SEED) -> PairedDifference:
    """Mean of ``after - before`` over units (both shape (n_units,), the same units in the same order).

    Raises:
        ValueError: lengths differ or there are no units.
    """
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired_difference: {before.shape[0]} units before, {after.shape[0]} after")
    delta = after - before
    draws = delta[_draws(len(delta), n_resamples, seed)].mean(axis=1)
    # (k + 1) / (B + 1): a bootstrap p-value is never 0 (at least one draw, the observed one, could cross)
    crossing = min(int((draws <= 0).sum()), int((draws >= 0).sum()))
    p = min(1.0, 2.0 * (crossing + 1) / (n_resamples + 1))
    return PairedDifference(float(delta.mean()), *_bounds(draws, level), p=p, n_units=len(delta))


def stereoset_units(results: dict) -> dict[str, dict[str, float]] | None:
    """Per target term of the overall task: ``{"ss": {term: SS_t}, "lms": {term: LMS_t}}`` (percent).

    ``None`` when the results hold no per-target records (files written before they were kept).
    """
    records = (((results.get("benchmarks") or {}).get("stereoset") or {}).get("per_target"))
    if not records:
        return None
    ss, lms = {}, {}
    for term, (n, pro, related) in records["overall"].items():
        ss[term] = 100.0 * pro / n
        lms[term] = 100.0 * related / (2 * n)
    return {"ss": ss, "lms": lms}


def crows_units(results: dict) -> list[float] | None:
    """Per CrowS-Pairs pair: 100 if ``sent_more`` scored higher, else 0 (mean = the metric); None if absent."""
    records = ((results.get("benchmarks") or {}).get("crows-pairs") or {}).get("per_pair")
    if not records:
        return None
    return [100.0 * int(win) for win in records["more_higher"]]


def _units(results: dict) -> dict[str, dict[str, float] | list[float] | None]:
    stereoset = stereoset_units(results) or {}
    return {"ss": stereoset.get("ss"), "lms": stereoset.get("lms"), "crows": crows_units(results)}


def run_intervals(results: dict) -> dict[str, Interval | None]:
    """95 % intervals of one eval result: ``ss`` and ``lms`` (over target terms) and ``crows`` (over pairs).

    A metric without per-unit records in ``results`` gives None.
    """
    out: dict[str, Interval | None] = {}
    for metric, units in _units(results).items():
        values = list(units.values()) if isinstance(units, dict) else units
        out[metric] = mean_interval(values) if values else None
    return out


def paired_tests(before: dict, after: dict) -> dict[str, PairedDifference | None]:
    """``after - before`` for ``ss``, ``lms`` (paired over target terms) and ``crows`` (over pairs).

    None where either run lacks per-unit records.

    Raises:
        ValueError: the runs were scored on different target terms or a different number of pairs.
    """
    first, second = _units(before), _units(after)
    out: dict[str, PairedDifference | None] = {}
    for metric in ("ss", "lms", "crows"):
        a, b = first[metric], second[metric]
        if not a or not b:
            out[metric] = None
        elif isinstance(a, dict):
            if set(a) != set(b):
                raise ValueError(f"paired test: the runs were scored on different target terms "
                                 f"({sorted(set(a) ^ set(b))[:5]} ...)")
            terms = sorted(a)
            out[metric] = paired_difference([a[t] for t in terms], [b[t] for t in terms])
        else:
            out[metric] = paired_difference(a, b)
    return out
