"""Bootstrap intervals and the paired test, with hand-computed values; CIs in amendlm compare."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from amendlm.bias.bootstrap import crows_units, mean_interval, paired_difference, paired_tests, run_intervals, stereoset_units
from amendlm.bias.compare import comparison_rows, markdown_table
from amendlm.cli import app


def with_units(per_target: dict, more_higher: list[int]) -> dict:
    """An eval result holding only the per-unit records (what `amendlm eval` now writes)."""
    ss = {t: 100.0 * pro / n for t, (n, pro, _) in per_target.items()}
    return {"config": {}, "model": "tiny", "benchmarks": {
        "stereoset": {"split": "test", "split_seed": 0, "per_target": {"overall": per_target},
                      "scores": {"overall": {"overall": {"ss": float(np.mean(list(ss.values()))), "lms": 80.0, "icat": 70.0}}}},
        "crows-pairs": {"scores": {"overall": {"metric": 100.0 * np.mean(more_higher)}},
                        "per_pair": {"more_higher": more_higher, "bias_type": ["race"] * len(more_higher)}}}}


def test_constant_units_give_a_point_interval():
    interval = mean_interval([60.0] * 5)
    assert (interval.value, interval.low, interval.high) == (60.0, 60.0, 60.0)


def test_two_units_interval_spans_the_extremes():
    # a draw of 2 units from {0, 100} has mean 0 (p 1/4), 50 (1/2) or 100 (1/4): 2.5 % and 97.5 % quantiles are 0 and 100
    interval = mean_interval([0.0, 100.0])
    assert interval.value == 50.0 and interval.low == 0.0 and interval.high == 100.0


def test_paired_shift_is_exact_and_significant():
    before = np.array([40.0, 55.0, 70.0, 62.5])
    test = paired_difference(before, before - 3.0)
    assert test.value == pytest.approx(-3.0) and test.low == pytest.approx(-3.0) and test.high == pytest.approx(-3.0)
    assert test.p == pytest.approx(2 / 2001) and test.n_units == 4  # no draw crosses zero: 2 (0 + 1) / (B + 1)


def test_symmetric_noise_is_not_significant():
    test = paired_difference([50.0, 50.0, 50.0, 50.0], [49.0, 51.0, 49.0, 51.0])
    assert test.value == 0.0 and test.low < 0 < test.high and test.p > 0.5


def test_paired_difference_needs_the_same_units():
    with pytest.raises(ValueError, match="3 units before, 2 after"):
        paired_difference([1, 2, 3], [1, 2])


def test_units_read_from_an_eval_result():
    result = with_units({"nurse": [4, 3, 6], "chess player": [2, 0, 2]}, [1, 0, 1, 1])
    units = stereoset_units(result)
    assert units["ss"] == {"nurse": 75.0, "chess player": 0.0}
    assert units["lms"] == {"nurse": 75.0, "chess player": 50.0}  # 100 * related / (2 n)
    assert crows_units(result) == [100.0, 0.0, 100.0, 100.0]
    assert stereoset_units({"benchmarks": {}}) is None and crows_units({"benchmarks": {}}) is None
    intervals = run_intervals(result)
    assert intervals["ss"].value == 37.5 and intervals["crows"].value == 75.0


def test_paired_tests_refuse_different_terms_and_compare_leaves_them_unpaired():
    a = with_units({"nurse": [4, 3, 6]}, [1])
    b = with_units({"mother": [4, 3, 6]}, [1])
    with pytest.raises(ValueError, match="different target terms"):
        paired_tests(a, b)
    rows = comparison_rows([("a", a), ("b", b)])  # still a table, without the paired test
    assert rows[1]["vs_first"] == {"ss": None, "lms": None, "crows": None} and rows[1]["ss_ci"] is not None


def test_compare_rows_and_markdown_carry_intervals(tmp_path):
    before = with_units({"a": [2, 2, 4], "b": [2, 2, 4]}, [1, 1])
    after = with_units({"a": [2, 1, 4], "b": [2, 1, 4]}, [1, 0])
    rows = comparison_rows([("before", before), ("after", after)])
    assert rows[0]["ss_ci"] == [100.0, 100.0] and "vs_first" not in rows[0]
    assert rows[1]["vs_first"]["ss"]["value"] == -50.0 and rows[1]["vs_first"]["ss"]["p"] < 0.001
    assert "| after | 50.00 [50.0, 50.0] |" in markdown_table(rows)
    paths = []
    for name, data in (("before", before), ("after", after)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "compare.json"
    result = CliRunner().invoke(app, ["compare", f"before={paths[0]}", f"after={paths[1]}", "--out", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Paired difference to before" in result.output and "-50.00" in result.output
    assert json.loads(out.read_text())["rows"][1]["vs_first"]["crows"]["value"] == -50.0
