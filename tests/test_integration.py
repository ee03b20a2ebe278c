"""Integration: the embedded model and data, with small limits (runs the real CLI)."""

import json

import pytest
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.data.crows_pairs import load_crows_pairs
from amendlm.data.stereoset import load_stereoset

pytestmark = pytest.mark.integration


def test_embedded_datasets_load_completely():
    clusters = load_stereoset()
    assert len(clusters) == 4229
    assert sum(c.task == "intrasentence" for c in clusters) == 2106
    assert len(load_crows_pairs()) == 1508


def test_eval_cli_on_embedded_model(tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", "--limit", "12", "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "StereoSet" in result.output and "CrowS-Pairs" in result.output and "perplexity" in result.output
    data = json.loads(out.read_text())
    assert data["model"] == "smollm2-135m-instruct" and data["adapter"] is None
    assert data["versions"]["torch"] and data["benchmarks"]["stereoset"]["split"] == "test"
    overall = data["benchmarks"]["stereoset"]["scores"]["overall"]["overall"]
    assert overall["n_clusters"] == 12 and 0 <= overall["ss"] <= 100 and overall["lms"] > 50
    ppl = data["benchmarks"]["perplexity"]["perplexity"]
    assert 5 < ppl < 200  # a trained 135M model on Wikipedia text; a random one would be ~49k
