"""experiments/eval_common.py: a training summary's seconds, marked as a lower bound when they are only part of a run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

from eval_common import log_shows_resume, seconds_cell, training_seconds  # noqa: E402  (experiments/eval_common.py)


def test_a_new_summary_says_itself_whether_its_seconds_are_whole():
    whole = {"seconds": 812.4, "seconds_this_run": 300.0, "seconds_complete": True}
    partial = {"seconds": 812.4, "seconds_this_run": 300.0, "seconds_complete": False}
    assert training_seconds(whole) == (812.4, False)
    assert training_seconds(partial) == (812.4, True)
    # the key decides even when a log is given (a run resumed from a checkpoint without seconds restarts them at 0)
    backwards = [{"event": "train", "step": 5, "seconds": 400.0}, {"event": "train", "step": 10, "seconds": 20.0}]
    assert training_seconds(whole, backwards) == (812.4, False)


def test_an_old_summary_is_a_lower_bound_only_when_its_align_train_log_shows_a_resume():
    old = {"seconds": 150.0}  # before seconds_complete: the last invocation's seconds
    resumed = [{"event": "train", "step": 5, "seconds": 100.0}, {"event": "heldout", "step": 5, "seconds": 110.0},
               {"event": "train", "step": 10, "seconds": 40.0}]  # the second part's clock started again at 0
    # val records time one evaluation each, not the run: their small seconds are no resume
    straight = [{"event": "val", "step": 0, "seconds": 30.0}, {"event": "train", "step": 5, "seconds": 100.0},
                {"event": "val", "step": 5, "seconds": 30.0}, {"event": "train", "step": 10, "seconds": 140.0}]
    legacy = [{"step": 5, "loss": 2.0, "seconds": 100.0}, {"step": 10, "loss": 1.0, "seconds": 140.0}]  # no event field
    assert log_shows_resume(resumed, 150.0, per_step=False)
    assert not log_shows_resume(straight, 150.0, per_step=False)
    assert training_seconds(old, resumed) == (150.0, True)
    assert training_seconds(old, straight) == (150.0, False)
    assert training_seconds(old, legacy) == (150.0, False)
    assert training_seconds(old) == (150.0, False)  # no log: counted as one go
    assert training_seconds(old, []) == (150.0, False)


def test_an_old_debias_summary_is_a_lower_bound_when_its_steps_took_longer_than_it_says():
    # debias's log.jsonl: step records hold one step's seconds; evaluations have an event and do not count
    steps = [{"step": s, "loss": 1.0, "seconds": 30.0} for s in (1, 2, 3, 4)]  # 120 s of steps in all
    log = [{"event": "eval", "step": 0, "seconds": 500.0}, *steps]
    assert training_seconds({"seconds": 100.0}, log, per_step=True) == (100.0, True)  # 120 > 100: an earlier part
    assert training_seconds({"seconds": 130.0}, log, per_step=True) == (130.0, False)  # evals + 120 s of steps
    assert not log_shows_resume(log, 120.0, per_step=True)  # equal is not more


def test_the_table_cell_rounds_and_marks_a_lower_bound():
    assert seconds_cell(812.4) == "812"
    assert seconds_cell(812.6, True) == "≥ 813"
    assert seconds_cell(*training_seconds({"seconds": 99.5, "seconds_complete": False})) == "≥ 100"
    assert seconds_cell(None) is None
    assert training_seconds({}) == (None, False)  # nothing recorded
    assert training_seconds({"seconds": None, "seconds_complete": False}) == (None, False)


def test_the_ram_debias_cost_table_shows_the_bound():
    from ram_debias_common import cost_table

    row = {"trainable": 10, "cost": "1.50", "cost_params": "1.10", "kept": "step 5"}
    table = cost_table({"a": {**row, "train_seconds": 812.4, "train_seconds_lower_bound": True},
                        "b": {**row, "train_seconds": 812.4, "train_seconds_lower_bound": False},
                        "c": {**row, "train_seconds": None}})
    lines = table.splitlines()
    assert "| ≥ 812 |" in lines[2] and "| 812 |" in lines[3] and "| n/a |" in lines[4]
