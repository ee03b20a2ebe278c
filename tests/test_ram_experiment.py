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
    assert "chosen by ROUGE-L on the 2 val prompts" in choice and "| RAM `mds` | 13.00 | best RAM mode |" in choice
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
    with pytest.raises(ValueError, match="different numbers of prompts: ram seed 0 1, sft-full seed 0 2$"):
        ram_common.seed_rows({"ram": {0: run([1.0])}, "sft-full": {0: run([1.0, 2.0], True)}})
    # rows_of names the decoding's files
    pipeline = FakePipeline({}, {})
    pipeline.evaluated = lambda group, name, decoding, seed, split="test": run([1.0] * (1 + seed))
    with pytest.raises(ValueError, match=r"prompts: eval_sampled_s0_ram.json 1, eval_sampled_s1_ram.json 2, .*sft-full.json"):
        ram_xsum_common.rows_of(pipeline, "sampled", {"seeds": [0, 1]})


def test_evaluations_recorded_before_the_val_split_existed_are_reused():
    old = {"step_config": {"proposal": "p", "task": {"split": "test"}, "trained": {"lr": 1.0}}}
    assert ram_common.recorded_eval(old) == {"val": None, "proposal": "p", "task": {"split": "test"}, "trained": {"lr": 1.0}}
    val = {"step_config": {"val": {"fraction": 0.05}, "trained": {}}}
    assert ram_common.recorded_eval(val)["val"] == {"fraction": 0.05}


# ----------------------------------------------------------------------------- ram_xsum's mds aligner-temperature lever

import ram_xsum_common  # noqa: E402  (experiments/ram_xsum_common.py)


def test_aligner_temperatures_parse_sorted_with_plain_mds_and_refuse_nonsense():
    assert ram_xsum_common.parse_temperatures("4, 2,,") == (1.0, 2.0, 4.0)  # 1 (plain mds) always in
    assert ram_xsum_common.parse_temperatures("1") == (1.0,)
    for bad, why in (("0", "> 0"), ("-2", "> 0"), ("nan", "> 0"), ("inf", "> 0"), ("two", "not a number")):
        with pytest.raises(ValueError, match=why):
            ram_xsum_common.parse_temperatures(bad)
    assert ram_xsum_common.mds_at(2.0) == "mds-te2" and ram_xsum_common.aligner_temperature_of("mds-te0.75") == 0.75


def test_the_best_aligner_temperature_is_the_val_argmax_the_smaller_on_a_tie_none_on_partial_data():
    assert ram_xsum_common.best_aligner_temperature({1.0: 13.0, 2.0: 14.5, 4.0: 14.0}) == 2.0
    assert ram_xsum_common.best_aligner_temperature({4.0: 14.5, 1.0: 13.0, 2.0: 14.5}) == 2.0  # tie: the smaller
    assert ram_xsum_common.best_aligner_temperature({1.0: 14.0, 2.0: 14.0}) == 1.0
    assert ram_xsum_common.best_aligner_temperature({1.0: 13.0, 2.0: None, 4.0: 20.0}) is None  # a val step missing
    assert ram_xsum_common.best_aligner_temperature({}) is None


class FakePipeline:
    """``evaluated``/``eval_path`` of ram_xsum's Pipeline over made-up ``align eval`` results of `mds`."""

    def __init__(self, val: dict[str, list[float] | None], test: dict[str, list[float]]):
        self.val, self.test, self.calls = val, test, []

    def eval_path(self, group, decoding_name, seed, split="test"):
        return Path(f"{'eval' if split == 'test' else split}_{decoding_name}_s{seed}_{group}.json")

    def evaluated(self, group, decoding_name, decoding, seed, split="test"):
        self.calls.append((group, split))
        values = (self.val if split == "val" else self.test).get(group)
        if values is None:
            return None
        metrics = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": sum(values) / len(values), "mean_words": 10.0,
                   "finish_reasons": {"eos": 1}, "per_prompt_rougeL": values,
                   "choices": {"fallback_rate": None, "follows_aligner_argmax": None, "follows_proposal_argmax": None}}
        return {"n_prompts": len(values), "systems": {"mds": metrics}}


GREEDY = {"greedy": True, "temperature": 1.0, "seeds": [0]}


def test_mds_temperatures_choose_on_val_read_the_chosen_test_row_and_enter_the_best_mode_choice():
    val = {"proposal": row([12.0, 12.0]), "aligner": row([10.0, 10.0]), "par": row([11.0, 11.0]),
           "par-kl": row([12.0, 12.0]), "sir": row([12.5, 12.5]), "mds": row([13.0, 13.0])}
    pipeline = FakePipeline({"mds-te2": [14.0, 15.0], "mds-te4": [14.0, 13.0]}, {"mds-te2": [16.0, 17.0, 18.0, 19.0]})
    temps = ram_xsum_common.mds_temperatures(pipeline, "greedy", GREEDY, val, (1.0, 2.0, 4.0))
    assert temps["val_rougeL"] == {"1": 13.0, "2": 14.5, "4": 13.5} and temps["chosen"] == 2.0
    assert (temps["row"], temps["best_row"], temps["missing"]) == ("mds-te2", "mds-te2", [])
    assert ("mds-te2", "test") in pipeline.calls and ("mds-te4", "test") not in pipeline.calls  # only the chosen T_e
    assert temps["test_rows"]["mds-te2"]["per_prompt_rougeL"] == [16.0, 17.0, 18.0, 19.0]
    assert [p.name for p in temps["paths"]] == ["val_greedy_s0_mds-te2.json", "val_greedy_s0_mds-te4.json",
                                                "eval_greedy_s0_mds-te2.json"]
    # the variant is a RAM candidate by its val ROUGE-L (14.5 > mds 13.0 > sir 12.5), after the four modes
    all_val = {**val, **temps["val_rows"]}
    mode = ram_common.best_ram_mode(all_val, ram_xsum_common.ram_candidates(temps["row"]))
    assert mode == "mds-te2" and ram_common.best_ram_mode(all_val) == "mds"  # without it: plain mds
    tied = {**all_val, "sir": row([14.5, 14.5])}
    assert ram_common.best_ram_mode(tied, ram_xsum_common.ram_candidates("mds-te2")) == "sir"  # a tie keeps the mode
    # its test row is read by the targets: +4 over the aligner, +6 over the proposal, every prompt alike
    test = {"proposal": row([10.0, 11.0, 12.0, 13.0]), "aligner": row([12.0, 13.0, 14.0, 15.0]),
            "mds": row([13.0, 14.0, 15.0, 16.0]), "sft-full": row([20.0, 21.0, 22.0, 23.0])}
    test = ram_xsum_common.with_rows_after(test, "mds", temps["test_rows"])
    assert list(test) == ["proposal", "aligner", "mds", "mds-te2", "sft-full"]
    targets = {t["against"]: t for t in ram_common.target_rows(test, ram_common.paired_intervals(test), mode)}
    assert targets["aligner"]["mode"] == "mds-te2" and targets["aligner"]["difference"] == pytest.approx(4.0)
    assert targets["proposal"]["difference"] == pytest.approx(6.0) and targets["aligner"]["met"]
    assert targets["sft-full"]["difference"] == pytest.approx(-4.0) and not targets["sft-full"]["met"]
    # the val table shows each T_e, the chosen mode and the best T_e marked; the test row is labelled
    test_labels, val_labels = ram_xsum_common.temperature_labels(temps, 1.0)
    assert test_labels == {"mds-te2": "RAM `mds` (T_e = 2, chosen on val)"}
    choice = ram_common.mode_choice(all_val, mode, 2, val_labels, "val_greedy_s0_ram", test, temps["best_row"])
    assert "| RAM `mds` (T_e = 1) | 13.00 |  |" in choice and "| RAM `mds` (T_e = 4) | 13.50 |  |" in choice
    assert "| RAM `mds` (T_e = 2) | 14.50 | best RAM mode; best `mds` T_e |" in choice
    assert "its test row is not evaluated yet" not in choice
    note = ram_xsum_common.temperature_note(temps, 1.0)
    assert "best val ROUGE-L at T_e = 2 (ties: the smaller T_e), evaluated on test as the row `mds-te2`" in note


def test_plain_mds_best_on_val_gets_no_extra_row_and_missing_val_steps_choose_nothing():
    val = {"mds": row([15.0, 15.0]), "par": row([11.0, 11.0])}
    pipeline = FakePipeline({"mds-te2": [14.0, 16.0]}, {})  # a tie with T_e = 1: the smaller
    temps = ram_xsum_common.mds_temperatures(pipeline, "greedy", GREEDY, val, (1.0, 2.0))
    assert (temps["chosen"], temps["row"], temps["best_row"], temps["test_rows"]) == (1.0, None, "mds", {})
    assert all(split == "val" for _, split in pipeline.calls)  # no test step for plain mds
    assert "RAM `mds` itself: no extra test row" in ram_xsum_common.temperature_note(temps, 1.0)
    # a temperature's val step missing (--render-available): no T_e, no mode; both say why
    pipeline = FakePipeline({"mds-te2": [14.0, 16.0]}, {"mds-te2": [1.0]})
    temps = ram_xsum_common.mds_temperatures(pipeline, "greedy", GREEDY, val, (1.0, 2.0, 4.0))
    assert temps["chosen"] is None and temps["missing"] == ["val_greedy_s0_mds-te4"] and temps["test_rows"] == {}
    assert temps["val_rougeL"] == {"1": 15.0, "2": 15.0, "4": None} and ("mds-te2", "test") not in pipeline.calls
    assert "T_e not chosen yet, val steps not done (`val_greedy_s0_mds-te4`)" in ram_xsum_common.temperature_note(temps, 1.0)
    pending = ram_common.mode_choice(val, None, 2, {}, ["val_greedy_s0_mds-te4"])
    assert "not chosen yet, the val step (`val_greedy_s0_mds-te4`) is not done" in pending
    many = ram_common.mode_choice({}, None, None, {}, ["val_greedy_s0_ram", "val_greedy_s0_mds-te4"])
    assert "the val steps (`val_greedy_s0_ram`, `val_greedy_s0_mds-te4`) are not done" in many
    assert ram_common.headline_row([], {}, [], 8, None, "val steps not done: x")[1] == "pending: val steps not done: x"
    for pending_steps, reason in ((["val_greedy_s0_ram"], "the val step has not run"),
                                  (["val_greedy_s0_ram", "val_greedy_s0_mds-te4"],
                                   "val steps not done: val_greedy_s0_ram, val_greedy_s0_mds-te4"),
                                  ([], "no RAM mode (par, par-kl, sir, mds) was evaluated on val")):
        why = ram_xsum_common.pending_reason(pending_steps, "val_greedy_s0_ram")
        assert ram_common.headline_row([], {}, [], 8, None, why)[1] == f"pending: {reason}"
    # the RAM val step itself missing: no T_e either
    temps = ram_xsum_common.mds_temperatures(FakePipeline({"mds-te2": [1.0]}, {}), "greedy", GREEDY, {}, (1.0, 2.0))
    assert temps["chosen"] is None and "the RAM val step" in ram_xsum_common.temperature_note(temps, 1.0)
    with pytest.raises(ValueError, match="3 val prompts, the RAM val step 2"):
        ram_xsum_common.mds_temperatures(FakePipeline({"mds-te2": [1.0, 2.0, 3.0]}, {}), "greedy", GREEDY, val, (1.0, 2.0))


def test_sampled_temperatures_are_multiples_of_the_decodings_and_one_temperature_is_no_lever():
    sampled = {"greedy": False, "temperature": 0.5, "seeds": [0, 1]}
    pipeline = FakePipeline({"mds-te1": [13.0, 13.0], "mds-te2": [12.0, 12.0]}, {"mds-te1": [1.0, 2.0]})
    temps = ram_xsum_common.mds_temperatures(pipeline, "sampled", sampled, {"mds": row([12.0, 12.0])}, (1.0, 2.0, 4.0))
    assert temps["temperatures"] == [0.5, 1.0, 2.0] and temps["chosen"] == 1.0 and temps["row"] == "mds-te1"
    assert sorted(c for c in pipeline.calls if c[1] == "val") == [("mds-te1", "val")] * 2 + [("mds-te2", "val")] * 2  # per seed
    alone = ram_xsum_common.mds_temperatures(FakePipeline({}, {}), "greedy", GREEDY, {"mds": row([1.0])}, (1.0,))
    assert alone["best_row"] is None and ram_xsum_common.temperature_note(alone, 1.0) == ""
    assert ram_xsum_common.temperature_labels(alone, 1.0) == ({}, {})
    # a decoding temperature :g rounds (1/3) is one T_e, plain mds, not also a step mds-te0.333333
    third = {"greedy": False, "temperature": 1 / 3, "seeds": [0]}
    pipeline = FakePipeline({"mds-te0.666667": [11.0, 11.0]}, {})
    temps = ram_xsum_common.mds_temperatures(pipeline, "sampled", third, {"mds": row([12.0, 12.0])}, (1.0, 2.0))
    assert temps["temperatures"] == [0.333333, 0.666667] and pipeline.calls == [("mds-te0.666667", "val")]
    assert temps["val_rougeL"] == {"0.333333": 12.0, "0.666667": 11.0} and temps["best_row"] == "mds"
    assert ram_xsum_common.temperature_labels(temps, 1 / 3)[1] == {"mds": "RAM `mds` (T_e = 0.333333)",
                                                                   "mds-te0.666667": "RAM `mds` (T_e = 0.666667)"}
    assert "RAM `mds` itself: no extra test row" in ram_xsum_common.temperature_note(temps, 1 / 3)
