"""The ``amendlm align`` commands end to end on a tiny random model (seconds)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from amendlm.cli import app

from .conftest import make_byte_tokenizer, make_tiny_llama


def test_align_sample_train_generate_eval(tmp_path):
    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = [{"id": i, "prompt": f"note {i}: rain today", "response": f"rain {i}"} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, data = str(tmp_path / "tiny"), str(tmp_path / "d.jsonl")
    runner = CliRunner()

    sample = ["align", "sample", "--proposal", model, "--data", data, "--out", str(tmp_path / "s.jsonl"),
              "--max-new-tokens", "4", "--max-document-tokens", "0"]
    result = runner.invoke(app, sample)
    assert result.exit_code == 0, result.output
    assert "9 new samples" in result.output  # 10 rows, 1 held out (10%)
    assert "0 new samples (9 already done)" in runner.invoke(app, sample).output

    train = ["align", "train", "--out", str(tmp_path / "run"), "--samples", str(tmp_path / "s.jsonl"), "--proposal", model,
             "--init-from-proposal-layers", "1", "--data", data, "--max-document-tokens", "0", "--max-steps", "2",
             "--batch-size", "4"]
    budget = runner.invoke(app, [*train[:-6], "--max-document-tokens", "5", *train[-4:]])
    assert budget.exit_code == 1 and "max_document_tokens 0 vs 5" in budget.output  # sampled with no cut
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    again = runner.invoke(app, train)
    assert again.exit_code == 0 and "already finished" in again.output, again.output
    assert (tmp_path / "run" / "train_log.jsonl").read_text() == log  # nothing retrained, nothing appended
    aligner = str(tmp_path / "run")  # the run directory: its aligner/ is used

    result = runner.invoke(app, ["align", "generate", "note 3: rain", "--proposal", model, "--aligner", aligner,
                                 "--mode", "sir", "--candidates", "4", "--max-new-tokens", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["align", "eval", "--proposal", model, "--aligner", aligner, "--data", data,
                                 "--systems", "proposal,par-kl", "--max-new-tokens", "4", "--max-document-tokens", "0",
                                 "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "e.json").read_text())
    assert set(results["systems"]) == {"proposal", "par-kl"}
    assert 0 <= results["systems"]["par-kl"]["choices"]["fallback_rate"] <= 1
    assert (tmp_path / "e.generations.jsonl").is_file()

    bad = runner.invoke(app, ["align", "generate", "x", "--proposal", model, "--mode", "parr"])
    assert bad.exit_code != 0 and "Did you mean 'par'" in bad.output


def test_align_input_errors_are_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import amendlm.modeling

    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = [{"id": i, "prompt": f"note {i}", "response": f"rain {i}"} for i in range(6)] + [{"id": 6, "prompt": "x"}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, runner = str(tmp_path / "tiny"), CliRunner()
    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))

    def error(args, exit_code=1):
        result = runner.invoke(app, ["align", *args])
        assert result.exit_code == exit_code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        return result.output

    out = error(["generate", "hi", "--proposal", model, "--aligner", str(tmp_path / "runs" / "nope" / "aligner")])
    assert "--aligner" in out and "no such model directory" in out and len(out.strip().splitlines()) == 1
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "train_config.json").write_text("{}")
    assert "an align train run without aligner/" in error(["eval", "--proposal", model, "--aligner", str(tmp_path / "unfinished")])
    out = error(["train", "--out", str(tmp_path / "run"), "--samples", str(tmp_path / "missing.jsonl"), "--proposal", model,
                 "--init-from-proposal-layers", "1"])
    assert "missing.jsonl: no such samples file" in out
    (tmp_path / "s.jsonl").write_text("")
    out = error(["train", "--out", str(tmp_path / "run"), "--samples", str(tmp_path / "s.jsonl"), "--proposal", model,
                 "--init-from-proposal-layers", "1", "--data", str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl row 7: missing field 'response'" in out
    assert "bad.jsonl row 7" in error(["sample", "--proposal", model, "--out", str(tmp_path / "o" / "s.jsonl"),
                                      "--data", str(tmp_path / "bad.jsonl")])
    assert "max_new_tokens must be >= 1" in error(["sample", "--out", str(tmp_path / "o" / "s.jsonl"), "--max-new-tokens", "0"], 2)
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()  # no empty output directory left behind


def test_align_train_takes_device_auto_trains_where_accelerate_puts_it_and_prints_its_seconds(tmp_path, monkeypatch):
    import torch

    import amendlm.modeling

    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = [{"id": i, "prompt": f"note {i}: rain today", "response": f"rain {i}"} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"id": str(i), "sample": f"sun {i}"}) + "\n" for i in range(6)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    devices, load_model = [], amendlm.modeling.load_model

    def recorded(name, *args, **kwargs):
        devices.append(kwargs.get("device"))
        return load_model(name, *args, **kwargs)

    monkeypatch.setattr(amendlm.modeling, "load_model", recorded)
    result = CliRunner().invoke(app, ["align", "train", "--out", str(tmp_path / "run"), "--samples", str(tmp_path / "s.jsonl"),
                                      "--proposal", str(tmp_path / "tiny"), "--init-from-proposal-layers", "1",
                                      "--data", str(tmp_path / "d.jsonl"), "--max-document-tokens", "0", "--max-steps", "2",
                                      "--batch-size", "2", "--eval-fraction", "0", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert devices == ["cpu"]  # the Accelerator's device, not "auto"
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())  # the summary as data
    printed = result.stdout.strip().splitlines()[-1]  # and as one human line
    assert printed.startswith(f"trained 2 steps on {summary['n_examples']} examples in ") and "no held-out loss" in printed, printed
    assert f"aligner saved in {tmp_path / 'run' / 'aligner'} (summary: {tmp_path / 'run' / 'train_summary.json'})" in printed
    assert summary["steps"] == 2 and summary["seconds_complete"] is True  # trained in one go
    assert 0 < summary["seconds_this_run"] == summary["seconds"]
    assert (tmp_path / "run" / "aligner" / "config.json").is_file()


def test_align_train_takes_kl_texts_none_as_no_general_text_and_usage_errors_keep_their_quotes(tmp_path, monkeypatch):
    import amendlm.ram.train

    seen = []

    def stop(config, progress=False):
        seen.append(config)
        raise ValueError("stopped before training")

    monkeypatch.setattr(amendlm.ram.train, "train_aligner", stop)
    for value in ("none", "None", ""):
        result = CliRunner().invoke(app, ["align", "train", "--out", str(tmp_path / "run"), "--pairs", "stereoset", "--aligner", "x",
                                          "--kl-texts", value])
        assert result.exit_code == 1 and "stopped before training" in result.stderr, result.output
    assert [config.pairs.kl_texts for config in seen] == [None, None, None]
    assert [config.pairs.kl_text_field for config in seen] == ["document"] * 3
    result = CliRunner().invoke(app, ["align", "train", "--out", str(tmp_path / "run"), "--pairs", "stereoset", "--aligner", "x",
                                      "--kl-text-field", "text"])
    assert result.exit_code == 1 and seen[-1].pairs.kl_text_field == "text", result.output
    result = CliRunner().invoke(app, ["align", "sample", "--out", str(tmp_path / "s.jsonl"), "--split", "tset"])
    assert result.exit_code == 2 and "got 'tset' (see '" in result.stderr, result.stderr
