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
    targets = {t["against"]: t for t in ram_common.target_rows(rows, intervals, "par")}
    assert targets["aligner"]["met"] and targets["proposal"]["met"]  # +2 >= 1.5 (interval above 0), +4 >= 2
    assert targets["sft-lora"]["met"] and not targets["sft-full"]["met"]  # -1 >= -1, -2 < -1
    table = ram_common.systems_table(rows, intervals, {"par": "RAM `par`"})
    assert "| RAM `par` | 27.00 | 12.00 | 17.00 | +4.00 [+4.00, +4.00] | +2.00 [+2.00, +2.00] |" in table
    assert "met" in ram_common.targets_table(list(targets.values()), {})


def test_the_aligner_target_needs_its_interval_above_zero():
    rows = {"aligner": row([10.0, 10.0, 10.0, 10.0]), "par": row([16.0, 8.0, 14.0, 10.0])}  # mean +2, noisy
    intervals = ram_common.paired_intervals(rows)
    (target,) = ram_common.target_rows(rows, intervals, "par")
    assert target["difference"] == pytest.approx(2.0) and target["low"] < 0 and not target["met"]


def test_a_target_met_by_a_mode_that_is_nearly_the_proposal_says_so():
    rows = {"proposal": row([14.0, 16.0, 18.0, 20.0]), "aligner": row([12.0, 14.0, 16.0, 18.0]),
            "par-kl": {**row([14.0, 16.0, 18.0, 20.0]), "fallback_rate": 0.98}}
    targets = ram_common.target_rows(rows, ram_common.paired_intervals(rows), "par-kl")
    assert [t["fallback_rate"] for t in targets] == [0.98, 0.98]
    table = ram_common.targets_table(targets, {})
    assert "| met only through the proposal (falls back 98 %) |" in table  # +2 over the aligner: the proposal's
    rows["par-kl"]["fallback_rate"] = 0.5
    assert "| met |" in ram_common.targets_table(ram_common.target_rows(rows, ram_common.paired_intervals(rows), "par-kl"), {})


def test_the_best_mode_is_chosen_on_val_and_its_test_row_is_read():
    test = {"proposal": row([10.0, 12.0, 14.0, 16.0]), "aligner": row([12.0, 14.0, 16.0, 18.0]),
            "par": row([20.0, 22.0, 24.0, 26.0]), "mds": row([14.0, 16.0, 18.0, 20.0])}  # par best on test
    val = {"proposal": row([10.0, 10.0]), "aligner": row([11.0, 11.0]), "par": row([12.0, 12.0]), "mds": row([13.0, 13.0])}
    mode = ram_common.best_ram_mode(val)
    assert mode == "mds" and ram_common.best_ram_mode(test) == "par"  # the val choice, whatever test says
    targets = {t["against"]: t for t in ram_common.target_rows(test, ram_common.paired_intervals(test), mode)}
    assert targets["aligner"]["mode"] == "mds" and targets["aligner"]["difference"] == pytest.approx(2.0)  # mds's test row
    assert targets["proposal"]["difference"] == pytest.approx(4.0) and targets["proposal"]["met"]
    tied = {"par-kl": row([12.0]), "sir": row([12.0])}
    assert ram_common.best_ram_mode(tied) == "par-kl"  # a tie: the first in RAM_MODES order
    choice = ram_common.mode_choice(val, mode, 2, {"mds": "RAM `mds`"}, "val_greedy_s0_ram")
    assert "chosen by ROUGE-L on the 2 val prompts" in choice and "| RAM `mds` | 13.00 | chosen |" in choice
    assert "| par | 12.00 |  |" in choice
    what, value = ram_common.headline_row(list(targets.values()), test, [], 8)
    assert "best mode on val `mds`" in what and value.startswith("+2.00 [+2.00, +2.00] / +4.00")


def test_without_val_rows_no_mode_is_chosen_and_no_target_is_read():
    test = {"aligner": row([12.0, 14.0]), "par": row([20.0, 22.0])}
    assert ram_common.best_ram_mode(None) is None and ram_common.best_ram_mode({"aligner": row([1.0])}) is None
    assert ram_common.target_rows(test, ram_common.paired_intervals(test), None) == []  # never chosen on test instead
    pending = ram_common.mode_choice({}, None, None, {}, "val_greedy_s0_ram")
    assert "not chosen yet, the val step (`val_greedy_s0_ram`) is not done" in pending
    assert ram_common.headline_row([], test, [], 8)[1] == "pending: the val step has not run"


def test_seed_rows_average_seeds_name_fine_tunes_and_skip_incomplete_groups():
    def run(values, finetuned=False):
        metrics = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": sum(values) / len(values), "mean_words": 10.0,
                   "finish_reasons": {"eos": 1}, "per_prompt_rougeL": values,
                   "choices": {"fallback_rate": None, "follows_aligner_argmax": None, "follows_proposal_argmax": None}}
        return {"n_prompts": len(values), "systems": {"finetuned" if finetuned else "par": metrics}}

    rows, n, skipped = ram_common.seed_rows({"ram": {0: run([10.0, 20.0]), 1: run([20.0, 30.0])},
                                             "sft-lora": {0: run([1.0, 1.0], True), 1: None},
                                             "sft-full": {0: run([5.0, 7.0], True), 1: run([7.0, 9.0], True)}})
    assert (n, skipped, list(rows)) == (2, ["sft-lora"], ["par", "sft-full"])
    assert rows["par"]["per_prompt_rougeL"] == [15.0, 25.0] and rows["sft-full"]["rougeL"] == 7.0
    assert ram_common.seed_rows({"ram": {0: None}}) == ({}, None, ["ram"])
    with pytest.raises(ValueError, match="different numbers of prompts"):
        ram_common.seed_rows({"ram": {0: run([1.0])}, "sft-full": {0: run([1.0, 2.0], True)}})


def test_evaluations_recorded_before_the_val_split_existed_are_reused():
    old = {"step_config": {"proposal": "p", "task": {"split": "test"}, "trained": {"lr": 1.0}}}
    assert ram_common.recorded_eval(old) == {"val": None, "proposal": "p", "task": {"split": "test"}, "trained": {"lr": 1.0}}
    val = {"step_config": {"val": {"fraction": 0.05}, "trained": {}}}
    assert ram_common.recorded_eval(val)["val"] == {"fraction": 0.05}
