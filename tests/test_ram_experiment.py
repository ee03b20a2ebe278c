"""The RAM XSum table's arithmetic (experiments/ram_common.py) against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import ram_common  # noqa: E402  (experiments/ram_common.py)


def row(per_prompt, eos=0.5, fallback=None, follows=None):
    mean = sum(per_prompt) / len(per_prompt)
    return {"rouge1": mean + 10, "rouge2": mean - 5, "rougeL": mean, "mean_words": 20.0, "eos_share": eos,
            "fallback_rate": fallback, "follows_aligner_argmax": follows, "follows_proposal_argmax": None,
            "per_prompt_rougeL": list(per_prompt)}


def test_system_row_reads_an_align_eval_entry():
    metrics = {"rouge1": 30.0, "rouge2": 9.0, "rougeL": 22.0, "mean_words": 18.5, "finish_reasons": {"eos": 3, "stop": 1},
               "choices": {"fallback_rate": 0.25, "follows_aligner_argmax": 0.5, "follows_proposal_argmax": 0.75,
                           "token_steps": 40}, "per_prompt_rougeL": [20.0, 24.0, 22.0, 22.0]}
    r = ram_common.system_row(metrics, 4)
    assert r["eos_share"] == 0.75 and r["fallback_rate"] == 0.25 and r["per_prompt_rougeL"] == [20.0, 24.0, 22.0, 22.0]


def test_mean_over_seeds_averages_scalars_shares_and_each_prompt():
    a, b = row([10.0, 20.0], eos=0.5, fallback=0.2), row([30.0, 0.0], eos=1.0, fallback=0.4)
    mean = ram_common.mean_over_seeds([a, b])
    assert mean["per_prompt_rougeL"] == [20.0, 10.0] and mean["rougeL"] == 15.0
    assert mean["eos_share"] == 0.75 and mean["fallback_rate"] == pytest.approx(0.3)
    assert mean["follows_aligner_argmax"] is None and mean["seeds"] == 2
    with pytest.raises(ValueError, match="different numbers of prompts"):
        ram_common.mean_over_seeds([a, row([1.0])])


def test_paired_intervals_and_targets_by_hand():
    rows = {"proposal": row([10.0, 12.0, 14.0, 16.0]), "aligner": row([12.0, 14.0, 16.0, 18.0]),
            "par": row([14.0, 16.0, 18.0, 20.0]), "mds": row([11.0, 13.0, 15.0, 17.0]),
            "sft-lora": row([15.0, 17.0, 19.0, 21.0]), "sft-full": row([16.0, 18.0, 20.0, 22.0])}
    intervals = ram_common.paired_intervals(rows)
    # every prompt moves by the same amount, so every bootstrap draw gives it: the interval is a point
    assert intervals["par"]["aligner"] == pytest.approx({"value": 2.0, "low": 2.0, "high": 2.0, "p": 2 / 2001, "n_units": 4})
    assert intervals["par"]["proposal"]["value"] == pytest.approx(4.0) and intervals["proposal"]["proposal"] is None
    assert ram_common.best_ram_mode(rows) == "par"
    targets = {t["against"]: t for t in ram_common.target_rows(rows, intervals)}
    assert targets["aligner"]["met"] and targets["proposal"]["met"]  # +2 >= 1.5 (interval above 0), +4 >= 2
    assert targets["sft-lora"]["met"] and not targets["sft-full"]["met"]  # -1 >= -1, -2 < -1
    table = ram_common.systems_table(rows, intervals, {"par": "RAM `par`"})
    assert "| RAM `par` | 27.00 | 12.00 | 17.00 | +4.00 [+4.00, +4.00] | +2.00 [+2.00, +2.00] |" in table
    assert "met" in ram_common.targets_table(list(targets.values()), {})


def test_the_aligner_target_needs_its_interval_above_zero():
    rows = {"aligner": row([10.0, 10.0, 10.0, 10.0]), "par": row([16.0, 8.0, 14.0, 10.0])}  # mean +2, noisy
    intervals = ram_common.paired_intervals(rows)
    (target,) = ram_common.target_rows(rows, intervals)
    assert target["difference"] == pytest.approx(2.0) and target["low"] < 0 and not target["met"]


def test_a_target_met_by_a_mode_that_is_nearly_the_proposal_says_so():
    rows = {"proposal": row([14.0, 16.0, 18.0, 20.0]), "aligner": row([12.0, 14.0, 16.0, 18.0]),
            "par-kl": {**row([14.0, 16.0, 18.0, 20.0]), "fallback_rate": 0.98}}
    targets = ram_common.target_rows(rows, ram_common.paired_intervals(rows))
    assert [t["fallback_rate"] for t in targets] == [0.98, 0.98]
    table = ram_common.targets_table(targets, {})
    assert "| met only through the proposal (falls back 98 %) |" in table  # +2 over the aligner: the proposal's
    rows["par-kl"]["fallback_rate"] = 0.5
    assert "| met |" in ram_common.targets_table(ram_common.target_rows(rows, ram_common.paired_intervals(rows)), {})
