"""Small CLI pieces: ``--version``, the ``--kl-texts none`` parser both training commands share, and
``align train``'s closing line (hand-made summaries, no model)."""

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.errors import optional_name
from amendlm.ram.command_helpers import train_summary_line


def test_version_prints_the_installed_version_and_exits_before_any_command(monkeypatch):
    from amendlm.unlearn import trainer

    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a command ran"))
    for args in (["--version"], ["-V"], ["-V", "debias"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"amendlm {version('amendlm')}\n", args


def test_version_falls_back_to_the_source_tree_version(monkeypatch):
    import importlib.metadata

    import amendlm

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.setattr(amendlm, "__version__", "9.8.7")
    assert CliRunner().invoke(app, ["--version"]).stdout == "amendlm 9.8.7\n"


def test_optional_name_turns_none_and_empty_off_and_keeps_names():
    assert [optional_name(v) for v in (None, "", "  ", "none", "None", "NONE", " none ")] == [None] * 7
    assert [optional_name(v) for v in ("xsum-sample", "texts/none.jsonl", "nonexistent")] == [
        "xsum-sample", "texts/none.jsonl", "nonexistent"]


def test_debias_reads_kl_texts_none_as_align_train_does(tmp_path, monkeypatch):
    from amendlm.unlearn import trainer

    seen = []

    def fake_train(config, resume=False, on_record=None):
        seen.append(config)
        return trainer.TrainResult("completed", 0, config.out, None, None, 0.0)

    monkeypatch.setattr(trainer, "train", fake_train)
    for index, value in enumerate(("none", "None", "", "xsum-sample")):
        result = CliRunner().invoke(app, ["debias", "--out", str(tmp_path / f"run{index}"), "--no-progress",
                                          "--kl-texts", value])
        assert result.exit_code == 0, result.output
    assert [config.kl_texts for config in seen] == [None, None, None, "xsum-sample"]


def test_align_train_summary_line_states_steps_loss_selection_and_where_things_are():
    fresh = {"steps": 2, "n_examples": 6, "n_heldout": 0, "heldout": None, "seconds": 3.2, "seconds_this_run": 3.2,
             "seconds_complete": True, "aligner": "runs/a/aligner"}
    assert train_summary_line(fresh, "runs/a") == (
        "trained 2 steps on 6 examples in 3 s; no held-out loss (no examples held out); "
        "aligner saved in runs/a/aligner (summary: runs/a/train_summary.json)")
    resumed = {**fresh, "steps": 40, "n_examples": 60, "n_heldout": 3, "heldout": {"event": "heldout", "loss": 2.345678},
               "seconds": 1012.0, "seconds_this_run": 12.4,
               "selection": {"kept": {"step": 20, "worst_gap": 3.456, "lms_drop": 0.5}}}
    assert train_summary_line(resumed, "runs/a") == (
        "trained 40 steps on 60 examples in 1012 s (12 s in this run); held-out loss 2.3457 (3 examples held out); "
        "kept the val evaluation of step 20 (worst gap 3.46, LMS drop 0.50); "
        "aligner saved in runs/a/aligner (summary: runs/a/train_summary.json)")
    unknown_start = {**resumed, "seconds": 12.4, "seconds_complete": False, "selection": {"kept": None}}
    line = train_summary_line(unknown_start, "runs/a")
    assert " in at least 12 s; " in line and "no val evaluation kept: the last step's weights" in line
