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


def val_scores(model, tokenizer, clusters: Sequence[StereoSetCluster], config: UnlearnConfig) -> dict[str, dict]:
    """StereoSet scores per bias type and ``overall`` on ``clusters`` (val targets).

    Returns ``{name: {"ss", "lms", "icat", ...}}`` (percent, :class:`amendlm.bias.metrics`
    fields), names sorted.  The model is scored in eval mode (dropout off) and left in the
    mode it was in, also on an exception.
    """
    eval_config = EvalConfig(benchmarks=["stereoset"], split="val", split_seed=config.split_seed,
                             dtype=config.dtype, batch_size=32, progress=False)
    was_training = model.training
    model.eval()
    try:
        scored = stereoset_outcomes(model, tokenizer, list(clusters), eval_config)
    finally:
        model.train(was_training)
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
