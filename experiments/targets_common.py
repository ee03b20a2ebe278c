"""Why a run misses the BiasUnlearn SS targets, in sentences read from its val trajectory and its test
evaluation: shared by the experiments whose runs keep a val-selected checkpoint (``ram_debias.py``,
``unlearn_ablation.py``).  The selection rule these sentences explain is "the smallest worst-type
|SS − 50| among the val evaluations whose LMS fell at most the run's allowance" (BiasUnlearn's
``gap_within_lms``; RAM-debias's ``PairsConfig.max_lms_drop``)."""

from __future__ import annotations


def ss_targets_missed(checks: dict[str, list[dict]]) -> bool:
    """Whether a run missed an SS target (overall SS, every type's SS, no type below 46): ``checks`` maps a
    label to its :func:`amendlm.bias.compare.check_targets` dicts (``name``, ``passed``)."""
    from amendlm.bias.compare import TARGET_NAMES

    ss_name, types_name, _, _, _, lowest_name = TARGET_NAMES
    return any(c["passed"] is False and c["name"] in (ss_name, types_name, lowest_name)
               for run in checks.values() for c in run)


def _not_kept(close: dict, at: dict | None, max_lms_drop: float) -> str:
    """Why the selection rule (smallest worst-type gap among evaluations whose LMS drop is at most
    ``max_lms_drop``; the first on a tie) did not keep the val evaluation ``close`` but ``at``."""
    reasons = []
    if close["lms_drop"] > max_lms_drop:
        reasons.append(f"its LMS drop {close['lms_drop']:.2f} exceeded the {max_lms_drop:g}-point allowance")
    if at is not None and close["worst_gap"] > at["worst_gap"]:
        reasons.append("a bias type's gap was larger there")
    if not reasons:
        reasons.append("an earlier evaluation with the same worst-type gap was kept" if at is not None
                       else "no evaluation was kept")
    return " and ".join(reasons)


def why_missed(trajectories: dict[str, list[dict]], kept: dict[str, int | None], max_lms_drop: dict[str, float],
               test_ss: dict[str, float], base_ss: tuple[float, float], test_types: dict[str, tuple[int, int]],
               kept_what: str = "aligner") -> str:
    """Why the SS targets are missed, in sentences read from the data: per RAM run, the kept val evaluation (its
    overall and worst-type val SS, types below 46, and the test SS of the kept aligner) and the val evaluation
    closest to SS 50 (whether it was within 50 ± 2 and why the rule did not keep it: its LMS drop exceeded the
    allowance, a bias type's gap was larger there than at the kept one, or both); the val-to-test shift of the
    model alone; the size of the smallest test type.

    Args:
        trajectories: label -> ``"val"`` records (``step``, ``ss`` per type incl. ``overall``, ``lms_drop``).
        kept: label -> the kept step.
        max_lms_drop: label -> the run's selection rule LMS allowance (points).
        test_ss: label -> the kept aligner's overall test SS.
        base_ss: the model alone's overall ``(val SS at step 0, test SS)``.
        test_types: bias type -> ``(target terms, clusters)`` on test.
        kept_what: what a kept evaluation keeps (``aligner``, ``adapter``), for the wording.

    Returns:
        markdown (empty when there are no runs).
    """
    parts = []
    for label, records in trajectories.items():
        if not records:
            continue
        close = min(records, key=lambda r: (abs(r["ss"]["overall"] - 50), r["step"]))
        at = next((r for r in records if r["step"] == kept.get(label)), None)
        text = f"{label}: "
        if at is not None:
            types = {k: v for k, v in at["ss"].items() if k != "overall"}
            worst = max(types, key=lambda k: abs(types[k] - 50))
            below = [f"{k} {v:.1f}" for k, v in types.items() if v < 46]
            text += (f"kept step {at['step']}, val SS {at['ss']['overall']:.2f} with {worst} at {types[worst]:.1f}"
                     + (f" (below 46: {', '.join(below)})" if below else "")
                     + (f", test SS {test_ss[label]:.2f}" if label in test_ss else "") + "; ")
        within = abs(close["ss"]["overall"] - 50) <= 2
        text += (f"val SS closest to 50: {close['ss']['overall']:.2f} at step {close['step']}"
                 + (" (within 50 ± 2" + (f", not kept: {_not_kept(close, at, max_lms_drop[label])})" if close is not at else ")")
                    if within else " (outside 50 ± 2)"))
        parts.append(text)
    if not parts:
        return ""
    allowances = {max_lms_drop[label] for label, records in trajectories.items() if records}
    allowance = (f"within {allowances.pop():g} LMS points of step 0" if len(allowances) == 1 else
                 "within the run's LMS allowance of step 0 (" + ", ".join(
                     f"{label} {max_lms_drop[label]:g} points" for label, records in trajectories.items() if records) + ")")
    out = (f"Why the SS targets are missed: the {kept_what} kept is the val evaluation with the smallest worst-type "
           f"|SS − 50| among those {allowance} (the rule does not look at overall SS). "
           + "; ".join(parts) + ".  "
           f"Val and test target terms differ: the model alone scores SS {base_ss[0]:.2f} on val and {base_ss[1]:.2f} on test.")
    if test_types:
        small = min(test_types, key=lambda t: test_types[t][1])
        terms, clusters = test_types[small]
        out += (f"  The smallest test type, {small}, has {terms} target term{'s' if terms != 1 else ''} and {clusters} "
                "clusters" + (f", so one cluster moves its SS by {100 / clusters:.1f} points." if terms == 1 else "."))
    return out
