"""The ``amendlm align`` commands end to end on a tiny random model (seconds)."""

from __future__ import annotations

import json

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

    result = runner.invoke(app, ["align", "train", "--out", str(tmp_path / "run"), "--samples", str(tmp_path / "s.jsonl"),
                                 "--proposal", model, "--init-from-proposal-layers", "1", "--data", data,
                                 "--max-document-tokens", "0", "--max-steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    aligner = str(tmp_path / "run" / "aligner")

    result = runner.invoke(app, ["align", "generate", "note 3: rain", "--proposal", model, "--aligner", aligner,
                                 "--mode", "sir", "--candidates", "4", "--max-new-tokens", "5", "--seed", "1"])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["align", "eval", "--proposal", model, "--aligner", aligner, "--data", data,
                                 "--systems", "proposal,par-kl", "--max-new-tokens", "4", "--max-document-tokens", "0",
                                 "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "e.json").read_text())["systems"]) == {"proposal", "par-kl"}
    assert (tmp_path / "e.generations.jsonl").is_file()

    bad = runner.invoke(app, ["align", "generate", "x", "--proposal", model, "--mode", "parr"])
    assert bad.exit_code != 0 and "Did you mean 'par'" in bad.output
