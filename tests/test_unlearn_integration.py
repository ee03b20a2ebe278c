"""Integration: one BiasUnlearn step on the embedded model through the CLI, then the adapter loads."""

import json

import pytest
import torch
from typer.testing import CliRunner

from amendlm.cli import app

pytestmark = pytest.mark.integration


def test_debias_cli_one_step_produces_a_loadable_adapter(tmp_path):
    out = tmp_path / "bu"
    args = ["debias", "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--val-clusters", "8",
            "--kl-texts", "none", "--no-keep-best"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "val SS per bias type" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1
    assert (out / "ss_per_type.png").is_file()

    from amendlm.modeling import load_model
    from amendlm.scoring import score_pairs

    model, tokenizer = load_model("smollm2-135m-instruct", adapter=out)
    pair = [("The nurse was", " very caring.")]
    debiased = score_pairs(model, tokenizer, pair).logp_sum
    with model.disable_adapter():
        base = score_pairs(model, tokenizer, pair).logp_sum
    assert not torch.equal(debiased, base)  # the adapter is really applied (B moved off zero)
