"""In-loop evaluation of an unlearning run: StereoSet scores per bias type on the val targets.

The loop decides (swap focus, stop, keep the best weights) on the *val* split only; the test
split is reported by ``amendlm eval`` afterwards and never seen here.
"""

from __future__ import annotations

import zlib
from typing import Sequence

from amendlm.bias.evaluate import EvalConfig, stereoset_outcomes
from amendlm.bias.metrics import stereoset_score
from amendlm.data.stereoset import StereoSetCluster
from amendlm.modeling import eval_mode
from amendlm.unlearn.config import UnlearnConfig


def stratified_sample(clusters: Sequence[StereoSetCluster], n: int | None, seed: int) -> list[StereoSetCluster]:
    """About ``n`` clusters, each bias type proportionally but at least ``n / (2 * types)``.

    The draw is seeded per cluster id (``crc32(f"{seed}:{id}")``), so it does not depend on the
    order of ``clusters``; ``n`` of ``None`` or at least ``len(clusters)`` returns them all.
    """
    if n is None or n >= len(clusters):
        return list(clusters)
    by_type: dict[str, list[StereoSetCluster]] = {}
    for cluster in clusters:
        by_type.setdefault(cluster.bias_type, []).append(cluster)
    floor = n // (2 * len(by_type))
    chosen = []
    for name in sorted(by_type):
        group = sorted(by_type[name], key=lambda c: zlib.crc32(f"{seed}:{c.id}".encode()))
        chosen += group[: max(floor, round(n * len(group) / len(clusters)))]
    return chosen


def per_type_sample(clusters: Sequence[StereoSetCluster], n: int, seed: int,
                    task: str | None = None) -> list[StereoSetCluster]:
    """``n`` clusters of every bias type (all of a type that has fewer), optionally of one ``task``.

    The official in-loop evaluation scores 100 intrasentence clusters per bias type.  The draw
    is seeded per cluster id as in :func:`stratified_sample`; the result is sorted by bias type.
    """
    by_type: dict[str, list[StereoSetCluster]] = {}
    for cluster in clusters:
        if task is None or cluster.task == task:
            by_type.setdefault(cluster.bias_type, []).append(cluster)
    chosen = []
    for name in sorted(by_type):
        chosen += sorted(by_type[name], key=lambda c: zlib.crc32(f"{seed}:{c.id}".encode()))[:n]
    return chosen


def val_sample(clusters: Sequence[StereoSetCluster], config: UnlearnConfig) -> list[StereoSetCluster]:
    """The val clusters an unlearning run evaluates on: ``val_clusters_per_type`` of each bias
    type (:func:`per_type_sample`) or ``val_clusters`` stratified (:func:`stratified_sample`),
    restricted to ``val_task`` when set.  ``clusters`` are the val-split clusters."""
    if config.val_clusters_per_type is not None:
        return per_type_sample(clusters, config.val_clusters_per_type, config.seed, config.val_task)
    pool = [c for c in clusters if config.val_task is None or c.task == config.val_task]
    return stratified_sample(pool, config.val_clusters, config.seed)


def lms_qualifies(lms_drop: float, selection: str, max_lms_drop: float) -> bool:
    """Whether an evaluation may be kept under ``selection`` (DESIGN.md §4; issue 9 item 3).

    ``gap``: every evaluation; ``gap_within_lms``: those whose overall val LMS fell at most
    ``max_lms_drop`` points (percentage points, ``lms_drop = LMS(step 0) - LMS(step)``).

    Raises:
        ValueError: unknown ``selection``.
    """
    if selection == "gap":
        return True
    if selection == "gap_within_lms":
        return lms_drop <= max_lms_drop
    raise ValueError(f"unknown selection '{selection}'; valid: gap, gap_within_lms")


def val_scores(model, tokenizer, clusters: Sequence[StereoSetCluster], config: UnlearnConfig) -> dict[str, dict]:
    """StereoSet scores per bias type and ``overall`` on ``clusters`` (val targets).

    Returns ``{name: {"ss", "lms", "icat", ...}}`` (percent, :class:`amendlm.bias.metrics`
    fields), names sorted.  The model is scored in eval mode (dropout off) and left in the
    mode it was in, also on an exception.
    """
    return stereoset_type_scores(model, tokenizer, clusters, config.dtype, config.split_seed)


def stereoset_type_scores(model, tokenizer, clusters: Sequence[StereoSetCluster], dtype: str,
                          split_seed: int = 0) -> dict[str, dict]:
    """:func:`val_scores` for any scorable model (a causal LM, or a proposal x aligner pair,
    :class:`amendlm.product.ProductLM`) at ``dtype`` (``fp32`` / ``bf16``); ``split_seed`` is only recorded."""
    eval_config = EvalConfig(benchmarks=["stereoset"], split="val", split_seed=split_seed,
                             dtype=dtype, batch_size=32, progress=False)
    with eval_mode(model):
        scored = stereoset_outcomes(model, tokenizer, list(clusters), eval_config)
    groups: dict[str, list] = {"overall": [o for _, o in scored]}
    for cluster, outcome in scored:
        groups.setdefault(cluster.bias_type, []).append(outcome)
    return {name: stereoset_score(outcomes).to_dict() for name, outcomes in sorted(groups.items())}


def eval_record(step: int, scores: dict[str, dict]) -> dict:
    """The log record of one evaluation of :func:`val_scores` output.

    ``{"step", "event": "eval", "ss": {name: SS}, "lms": {name: LMS}, "worst_gap"}``, where
    ``worst_gap`` is the largest ``|SS - 50|`` (percentage points) over the bias types, ``overall``
    excluded: the quantity the stop rule and keep-best compare.
    """
    types = [score["ss"] for name, score in scores.items() if name != "overall"]
    return {"step": step, "event": "eval", "ss": {n: s["ss"] for n, s in scores.items()},
            "lms": {n: s["lms"] for n, s in scores.items()}, "worst_gap": max(abs(v - 50) for v in types)}
