"""``align eval --split val``: exactly the prompts ``align train`` held out, and one-line refusals (tiny models)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.ram.data import TaskConfig, task_rows
from amendlm.ram.validation import ValSplit, check_against_run, heldout_rows, run_of, run_val, val_rows

from .conftest import make_byte_tokenizer, make_tiny_llama

FRACTION, SEED = 0.2, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny proposal, a 22-row task (2 test rows: 10 %), samples missing or blank for 3 train prompts, and an ``align train`` run (1 step) whose held-out ids are recorded as ``heldout_ids`` returned them."""
    import amendlm.ram.train
    from amendlm.ram.train import TrainConfig, train_aligner

    root = tmp_path_factory.mktemp("val")
    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rows = [{"id": f"r{i}", "prompt": f"note {i}: rain", "response": f"rain {i}"} for i in range(22)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TaskConfig(data=str(root / "d.jsonl"), split="train", max_document_tokens=0)
    train_ids = [r["id"] for r in task_rows(task)]
    lacking = train_ids[1:4]  # one missing, two blank: not examples, so not held out either
    samples = [{"id": i, "sample": " " if i in lacking[1:] else f"sun {i}"} for i in train_ids if i != lacking[0]]
    (root / "s.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    held, real = [], amendlm.ram.train.heldout_ids
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(amendlm.ram.train, "heldout_ids", lambda *a, **k: held.append(real(*a, **k)) or held[-1])
        train_aligner(TrainConfig(out=str(root / "run"), samples=str(root / "s.jsonl"), proposal=str(root / "tiny"),
                                  init_from_proposal_layers=1, task=task, max_steps=1, batch_size=4, dtype="fp32",
                                  eval_fraction=FRACTION, seed=SEED))
    return root, task, held[0], train_ids, lacking


def test_val_ids_are_exactly_the_ids_align_train_held_out(trained):
    root, task, held, train_ids, lacking = trained
    assert len(train_ids) == 20 and len(held) == round(FRACTION * 17)  # 22 - 2 test; 3 without a sample
    val = run_val(root / "run")
    assert val == ValSplit(FRACTION, SEED, str(root / "s.jsonl"), None)
    rows = val_rows(dataclasses.replace(task, split="test"), val)  # the task's split is not read
    assert {r["id"] for r in rows} == held and [r["id"] for r in rows] == [i for i in train_ids if i in held]
    check_against_run(task, val, root / "run")  # the run's settings and counts: accepted
    assert [r["id"] for r in val_rows(dataclasses.replace(task, limit=2), val)] == [r["id"] for r in rows][:2]
    assert run_of(str(root / "run")) == run_of(str(root / "run" / "aligner")) == root / "run" and run_of(str(root)) is None
    # without the samples file every train prompt counts: another number held out, refused against the run
    blind, n = heldout_rows(task, ValSplit(FRACTION, SEED))
    assert n == 20 and len(blind) == round(FRACTION * 20) != len(held)
    with pytest.raises(ValueError, match=r"4 of 20 train prompts held out here, 3 of 17 in .*train_config.json"):
        check_against_run(task, ValSplit(FRACTION, SEED), root / "run")


def test_xsum_val_is_40_of_its_799_train_prompts_the_empty_document_left_out():
    rows, n = heldout_rows(TaskConfig(), ValSplit())  # as align train held out of runs/ram/small8 (759 + 40)
    assert (len(rows), n) == (40, 799) and {r["id"] for r in rows} <= {r["id"] for r in task_rows(TaskConfig())}


def test_val_settings_that_disagree_with_the_run_are_refused(trained):
    root, task, *_ = trained
    val = run_val(root / "run")
    with pytest.raises(ValueError, match=r"val fraction \(--eval-fraction\) 0.1 vs 0.2; val seed \(--seed\) 0 vs 3 "):
        check_against_run(task, dataclasses.replace(val, fraction=0.1, seed=0), root / "run")
    with pytest.raises(ValueError, match=r"split_seed 1 vs 0 \(here vs "):
        check_against_run(dataclasses.replace(task, split_seed=1), val, root / "run")
    with pytest.raises(ValueError, match="a val fraction of 0 holds out no prompts"):
        ValSplit(0.0)
    (root / "link.jsonl").unlink(missing_ok=True)
    (root / "link.jsonl").symlink_to(root / "d.jsonl")  # the same data file by another name: accepted
    check_against_run(dataclasses.replace(task, data=str(root / "link.jsonl")), val, root / "run")
    with pytest.raises(ValueError, match=r"data '.*missing.jsonl' vs '.*d.jsonl'"):
        check_against_run(dataclasses.replace(task, data=str(root / "missing.jsonl")), val, root / "run")


def test_a_run_without_a_recorded_seed_took_the_default_one(trained, tmp_path):
    root, task, *_ = trained
    saved = json.loads((root / "run" / "train_config.json").read_text())
    (tmp_path / "train_config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "seed"}))
    val = run_val(tmp_path)
    assert val.seed == 0
    check_against_run(task, val, tmp_path)  # seed 0 against the default, not against None
    with pytest.raises(ValueError, match=r"val seed \(--seed\) 3 vs 0 "):
        check_against_run(task, dataclasses.replace(val, seed=3), tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_a_broken_train_config_is_named_in_one_line(tmp_path, text, message):
    (tmp_path / "train_config.json").write_text(text)
    for call in (lambda: run_val(tmp_path), lambda: check_against_run(TaskConfig(), ValSplit(), tmp_path)):
        with pytest.raises(ValueError, match=f"train_config.json: {message}"):
            call()
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), got 1"):
        ValSplit(1.0)


def test_align_eval_on_val_and_its_one_line_refusals(trained, tmp_path, monkeypatch):
    import amendlm.modeling

    root, task, held, *_ = trained
    runner = CliRunner()
    common = ["align", "eval", "--proposal", str(root / "tiny"), "--data", str(root / "d.jsonl"), "--max-document-tokens",
              "0", "--systems", "proposal,par-kl", "--max-new-tokens", "2"]
    out = tmp_path / "e.json"
    result = runner.invoke(app, [*common, "--aligner", str(root / "run"), "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results["ids"]) == held and results["n_prompts"] == len(held)
    assert results["config"]["split"] == "val" and results["config"]["task"]["split"] == "train"
    assert (results["config"]["val"]["fraction"], results["config"]["val"]["seed"]) == (FRACTION, SEED)
    assert "warning" not in result.output  # the run's own settings: checked
    result = runner.invoke(app, [*common, "--aligner", str(root / "tiny"), "--split", "val", "--val-fraction",
                                 str(FRACTION), "--limit", "1", "--out", str(out)])
    assert result.exit_code == 0 and "cannot be checked" in result.output, result.output  # a plain model: assumed
    result = runner.invoke(app, [*common, "--aligner", str(root / "run"), "--out", str(out), "--limit", "2"])
    assert result.exit_code == 0, result.output
    test = json.loads(out.read_text())
    assert test["config"]["split"] == "test" and test["config"]["val"] is None and test["n_prompts"] == 2

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    (root / "nothing-held").mkdir(exist_ok=True)
    saved = json.loads((root / "run" / "train_config.json").read_text())
    (root / "nothing-held" / "train_config.json").write_text(json.dumps({**saved, "eval_fraction": 0.0}))

    def error(args, code=1):
        result = runner.invoke(app, [*common, *args, "--out", str(tmp_path / "no.json")])
        assert result.exit_code == code and len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert "val fraction (--eval-fraction) 0.1 vs 0.2" in error(["--aligner", str(root / "run"), "--split", "val",
                                                                   "--val-fraction", "0.1"])
    assert "val seed (--seed) 0 vs 3" in error(["--aligner", str(root / "run" / "aligner"), "--split", "val", "--val-seed", "0"])
    assert "split_seed 2 vs 0" in error(["--aligner", str(root / "run"), "--split", "val", "--split-seed", "2"])
    assert "held out no prompts (trained with --eval-fraction 0)" in error(["--aligner", str(root / "nothing-held"),
                                                                            "--split", "val"])
    assert "a val fraction of 0 holds out no prompts" in error(["--aligner", str(root / "tiny"), "--split", "val",
                                                                "--val-fraction", "0"])
    assert "apply to --split val only" in error(["--aligner", str(root / "run"), "--val-seed", "3"], 2)
    assert "--split must be test or val" in error(["--aligner", str(root / "run"), "--split", "train"], 2)
    assert not (tmp_path / "no.json").exists()


def test_warm_up_text_leaves_out_the_documents_align_train_holds_out(trained):
    from amendlm.ram.distill import DistillConfig, warmup_texts
    from amendlm.ram.train import TrainConfig

    root, task, held, train_ids, lacking = trained
    training = TrainConfig(out="x", samples=str(root / "s.jsonl"), task=task, eval_fraction=FRACTION, seed=SEED,
                           init_from_proposal_layers=1)
    config = DistillConfig(out="w", task=task, holdout=ValSplit.of_training(training))
    prompts = {r["prompt"]: r["id"] for r in task_rows(task)}
    kept = {prompts[t] for t in warmup_texts(config)}
    assert held and kept == set(train_ids) - set(held)  # every train document but the held-out prompts'
    assert {prompts[t] for t in warmup_texts(dataclasses.replace(config, holdout=None))} == set(train_ids)


def test_a_finished_warm_up_made_otherwise_is_refused_not_reused(tmp_path):
    from amendlm.ram.distill import DistillConfig, distill_aligner

    out = tmp_path / "warm"
    (out / "aligner").mkdir(parents=True)
    (out / "aligner" / "config.json").write_text("{}")
    (out / "distill_summary.json").write_text(json.dumps({"steps": 3}))
    config = DistillConfig(out=str(out), steps=3, dtype="fp32")
    recorded = {**json.loads(json.dumps(dataclasses.asdict(config))), "dtype": "fp32", "n_texts": 9}
    (out / "distill_config.json").write_text(json.dumps(recorded))
    assert distill_aligner(config)["already_finished"]  # same configuration: returned, nothing trained
    (out / "distill_config.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "holdout"}))
    with pytest.raises(ValueError, match=r"another configuration \(holdout differ"):  # made before holdout existed
        distill_aligner(config)
    (out / "distill_config.json").write_text(json.dumps({**recorded, "steps": 4}))
    with pytest.raises(ValueError, match="steps differ"):
        distill_aligner(config)
