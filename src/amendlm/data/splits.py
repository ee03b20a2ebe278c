"""Deterministic, seeded StereoSet split by target term (train / val / test).

Later stages train on ``train`` targets, decide (early stopping, dataset swapping) on ``val``
targets and report on ``test`` targets; no target term appears in two splits, so a reported
number is never measured on a target the model was trained or tuned on.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from amendlm.data.stereoset import StereoSetCluster

SPLITS = ("train", "val", "test", "all")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
DEFAULT_SEED = 0


def split_targets(
    clusters: Sequence[StereoSetCluster], seed: int = DEFAULT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, set[str]]:
    """Assign every target term to one of train / val / test, stratified by bias type.

    Within each bias type the sorted targets are shuffled with ``random.Random(seed + crc)`` and
    cut by ``fractions``; val and test get at least one target each when a bias type has three
    or more.  The result depends only on the set of (bias type, target) pairs and the seed.

    Raises:
        ValueError: fractions are negative or do not sum to 1.
    """
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    by_type: dict[str, set[str]] = {}
    for cluster in clusters:
        by_type.setdefault(cluster.bias_type, set()).add(cluster.target)
    assignment: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for bias_type in sorted(by_type):
        targets = sorted(by_type[bias_type])
        salt = int(hashlib.sha256(bias_type.encode()).hexdigest()[:8], 16)
        random.Random(seed + salt).shuffle(targets)
        n = len(targets)
        n_val = round(n * fractions[1])
        n_test = round(n * fractions[2])
        if n >= 3:
            n_val, n_test = max(1, n_val), max(1, n_test)
        n_train = n - n_val - n_test
        assignment["train"].update(targets[:n_train])
        assignment["val"].update(targets[n_train : n_train + n_val])
        assignment["test"].update(targets[n_train + n_val :])
    return assignment


def select_split(
    clusters: Sequence[StereoSetCluster], split: str, seed: int = DEFAULT_SEED
) -> list[StereoSetCluster]:
    """Keep the clusters whose target belongs to ``split`` (``"all"`` keeps everything).

    Raises:
        ValueError: unknown split name.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if split == "all":
        return list(clusters)
    targets = split_targets(clusters, seed)[split]
    return [c for c in clusters if c.target in targets]
