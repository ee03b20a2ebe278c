"""CLI input errors: one clear line, exit code 1, before any model is loaded."""

import json

from typer.testing import CliRunner

from amendlm.cli import app


def test_bad_data_fails_fast_with_file_row_and_field(tmp_path, monkeypatch):
    import amendlm.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the data is bad")

    monkeypatch.setattr(amendlm.modeling, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "intrasentence", "target": "x"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--stereoset", str(bad), "--benchmarks", "stereoset"])
    assert result.exit_code == 1
    assert f"error: {bad} row 1: missing field" in result.output
    assert "Traceback" not in result.output

    missing = CliRunner().invoke(app, ["eval", "--crows-pairs", str(tmp_path / "nope.csv"), "--benchmarks", "crows-pairs"])
    assert missing.exit_code == 1 and "nope.csv' is neither an embedded dataset" in missing.output


def test_unknown_benchmark_is_a_usage_error():
    result = CliRunner().invoke(app, ["eval", "--benchmarks", "stereoset,glue"])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


def test_eval_of_an_adapter_on_all_targets_warns_that_training_targets_are_included(tmp_path, monkeypatch):
    import amendlm.bias.evaluate

    def stop(*args, **kwargs):
        raise ValueError("stopped before loading")

    monkeypatch.setattr(amendlm.bias.evaluate, "evaluate_model", stop)
    warned = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path), "--benchmarks", "stereoset"])
    assert "--split all includes the StereoSet target terms" in warned.output and warned.exit_code == 1
    held_out = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path), "--split", "test", "--benchmarks", "stereoset"])
    assert "includes the StereoSet target terms" not in held_out.output
