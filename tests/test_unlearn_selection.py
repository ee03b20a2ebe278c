"""LMS-aware keep-best: the smallest worst val SS gap among evaluations whose val LMS fell <= 2.

The val scores are scripted per step (the tiny model's own are noise), so the kept step is known.
"""

import json

import pytest

from amendlm.unlearn import trainer as trainer_module
from amendlm.unlearn.evaluation import lms_qualifies
from tests.test_unlearn_trainer import make_trainer

# step: (worst gap, overall LMS); step 1 has the smallest gap but lost 10 LMS points
SCRIPT = {0: (10.0, 80.0), 1: (1.0, 70.0), 2: (4.0, 79.0), 3: (6.0, 79.5)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def scripted(monkeypatch):
    def fake_scores(model, tokenizer, clusters, config):
        gap, lms = SCRIPT[fake_scores.step()]
        row = lambda ss: {"ss": ss, "lms": lms, "icat": 0.0}  # noqa: E731
        return {"gender": row(50 + gap), "overall": row(50 + gap / 2), "race": row(50 - gap / 2)}

    monkeypatch.setattr(trainer_module, "val_scores", fake_scores)
    return fake_scores


def run(tmp_path, scripted, **options):
    trainer = make_trainer(tmp_path, method="sft-anti", max_steps=3, eval_every=1, **options)
    scripted.step = lambda: trainer.state.step
    snapshots = {}
    save = trainer_module.artifacts.save_weights

    def remember(directory, model):  # which step's weights each snapshot holds
        snapshots[directory.name] = trainer.state.step
        save(directory, model)

    trainer_module.artifacts.save_weights, restore = remember, save
    try:
        result = trainer.train()
    finally:
        trainer_module.artifacts.save_weights = restore
    return result, json.loads((tmp_path / "run" / "summary.json").read_text()), snapshots


def test_the_rule():
    assert lms_qualifies(10.0, "gap", 2.0) and lms_qualifies(2.0, "gap_within_lms", 2.0)
    assert not lms_qualifies(2.01, "gap_within_lms", 2.0)
    with pytest.raises(ValueError, match="valid: gap, gap_within_lms"):
        lms_qualifies(0.0, "lms", 2.0)


def test_gap_selection_keeps_the_smallest_gap_whatever_the_lms(tmp_path, scripted):
    result, summary, snapshots = run(tmp_path, scripted)
    assert result.best_step == 1 and snapshots["best"] == 1
    assert summary["selection"]["selected"] == {"step": 1, "worst_gap": 1.0, "lms_drop": 10.0}


def test_gap_within_lms_skips_the_evaluation_that_lost_the_lm(tmp_path, scripted):
    result, summary, snapshots = run(tmp_path, scripted, selection="gap_within_lms")
    assert result.best_step == 2 and snapshots["best"] == 2 and summary["weights_saved"] == "best (step 2)"
    selection = summary["selection"]
    assert (selection["rule"], selection["base_lms"]) == ("gap_within_lms", 80.0)
    assert selection["selected"] == {"step": 2, "worst_gap": 4.0, "lms_drop": 1.0}
    assert selection["smallest_gap"] == {"step": 1, "worst_gap": 1.0, "lms_drop": 10.0}  # both logged
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "event" in line]
    assert [e["lms_drop"] for e in evals] == [0.0, 10.0, 1.0, 0.5]


def test_no_qualifying_evaluation_falls_back_to_the_smallest_gap_with_a_warning(tmp_path, scripted, monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "lms_qualifies", lambda drop, rule, limit: False)
    result, summary, snapshots = run(tmp_path, scripted, selection="gap_within_lms")
    assert result.best_step == 1 and snapshots["best_gap"] == 1 and "best" not in snapshots
    assert summary["weights_saved"] == "best (step 1)"
    assert "keeping the smallest gap (step 1)" in caplog.text
