"""amendlm compare: rows, the BiasUnlearn targets with hand-computed numbers, markdown, the command."""

import json

import pytest
from typer.testing import CliRunner

from amendlm.bias.compare import check_targets, comparison_rows, load_eval, markdown_table
from amendlm.cli import app


def eval_results(ss=None, lms=None, icat=None, types=None, crows=None, ppl=None) -> dict:
    """A results dict in the format ``amendlm eval --out`` writes; a benchmark is present only when given."""
    benchmarks = {}
    if ss is not None:
        overall = {name: {"ss": value, "lms": 80.0, "icat": 70.0, "n_clusters": 10, "n_targets": 2}
                   for name, value in (types or {}).items()}
        overall["overall"] = {"ss": ss, "lms": lms, "icat": icat, "n_clusters": 40, "n_targets": 8}
        benchmarks["stereoset"] = {"split": "test", "split_seed": 0, "scores": {"overall": overall}}
    if crows is not None:
        benchmarks["crows-pairs"] = {"scores": {"overall": {"metric": crows, "n_pairs": 100, "n_ties": 0}}}
    if ppl is not None:
        benchmarks["perplexity"] = {"perplexity": ppl, "nll_per_token": 3.0, "n_tokens": 1000}
    return {"config": {}, "benchmarks": benchmarks, "model": "tiny"}


BALANCED = {"gender": 50.0, "profession": 50.0, "race": 50.0, "religion": 50.0}
BEFORE = eval_results(ss=57.5, lms=81.0, icat=68.6, types={"gender": 59.3, "profession": 57.7, "race": 57.5, "religion": 53.8},
                      crows=55.57, ppl=20.0)


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def target(before: dict, after: dict, prefix: str) -> tuple[bool, str]:
    found = [(passed, measured) for name, passed, measured in check_targets(before, after) if name.startswith(prefix)]
    assert len(found) == 1, check_targets(before, after)
    return found[0]


# ---------------------------------------------------------------- load_eval


def test_load_eval_returns_the_results(tmp_path):
    assert load_eval(write(tmp_path / "a.json", BEFORE)) == BEFORE


@pytest.mark.parametrize("broken, field", [
    ({"config": {}}, "'benchmarks'"),
    ({"benchmarks": {"perplexity": {"n_tokens": 3}}}, "'benchmarks.perplexity.perplexity'"),
    ({"benchmarks": {"crows-pairs": {"scores": {}}}}, "'benchmarks.crows-pairs.scores.overall.metric'"),
    ({"benchmarks": {"stereoset": {"scores": {"overall": {"overall": {"ss": 50.0, "lms": 90.0}}}}}},
     "'benchmarks.stereoset.scores.overall.overall.icat'"),
    ({"benchmarks": {"perplexity": {"perplexity": "27.1"}}}, "'benchmarks.perplexity.perplexity' is not a finite number"),
])
def test_load_eval_names_file_and_missing_field(tmp_path, broken, field):
    path = write(tmp_path / "bad.json", broken)
    with pytest.raises(ValueError, match=f"bad.json: .*{field}"):
        load_eval(path)


def test_load_eval_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        load_eval(bad)
    with pytest.raises(ValueError, match="list.json: expected a JSON object"):
        load_eval(write(tmp_path / "list.json", [1, 2]))
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        load_eval(tmp_path / "nope.json")


# ---------------------------------------------------------------- rows


def test_comparison_rows_read_overall_per_type_crows_and_perplexity():
    only_stereoset = eval_results(ss=52.0, lms=79.0, icat=75.84, types={"gender": 48.0, "race": 55.0})
    rows = comparison_rows([("before", BEFORE), ("after", only_stereoset)])
    assert rows[0] == {"run": "before", "ss": 57.5, "lms": 81.0, "icat": 68.6, "ss_gender": 59.3, "ss_profession": 57.7,
                       "ss_race": 57.5, "ss_religion": 53.8, "crows": 55.57, "ppl": 20.0}
    # missing benchmarks and bias types are None
    assert rows[1] == {"run": "after", "ss": 52.0, "lms": 79.0, "icat": 75.84, "ss_gender": 48.0, "ss_profession": None,
                       "ss_race": 55.0, "ss_religion": None, "crows": None, "ppl": None}


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("ss, passed", [(51.9, True), (48.0, True), (52.1, False), (47.5, False)])
def test_overall_ss_within_2(ss, passed):
    # |SS - 50|: 1.9, 2.0 (the bound is inclusive), 2.1, 2.5
    assert target(BEFORE, eval_results(ss=ss, lms=80.0, icat=70.0), "overall SS")[0] is passed


def test_every_bias_type_within_4():
    inside = {"gender": 53.5, "profession": 47.0, "race": 50.0, "religion": 54.0}  # worst religion, gap exactly 4
    passed, measured = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=inside), "every bias type")
    assert passed and measured == "worst religion 54.00 (|SS−50| = 4.00)"
    outside = {**inside, "gender": 45.5}  # gap 4.5
    passed, measured = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=outside), "every bias type")
    assert not passed and measured.startswith("worst gender 45.50")


@pytest.mark.parametrize("lms_after, passed", [(79.5, True), (79.0, True), (78.9, False), (83.0, True)])
def test_lms_drop_at_most_2_points(lms_after, passed):
    # 81.0 - after: drop 1.5, 2.0 (inclusive), 2.1, -2.0 (a gain)
    ok, measured = target(BEFORE, eval_results(ss=50.0, lms=lms_after, icat=70.0), "LMS drop")
    assert ok is passed
    assert measured == f"LMS 81.00 → {lms_after:.2f} (drop {81.0 - lms_after:.2f})"


@pytest.mark.parametrize("ppl_after, passed", [(20.5, True), (21.0, True), (21.1, False), (18.0, True)])
def test_perplexity_increase_at_most_5_percent(ppl_after, passed):
    # 20.0 -> 20.5 is +2.5 %, 21.0 exactly +5 % (inclusive; 21/20 - 1 is 0.050000000000000044 in floats), 21.1 +5.5 %
    ok, measured = target(BEFORE, eval_results(ppl=ppl_after), "perplexity increase")
    assert ok is passed
    assert measured.endswith(f"({(ppl_after / 20.0 - 1):+.1%})")


@pytest.mark.parametrize("crows_after, passed", [(54.24, True), (46.0, True), (56.0, False), (44.0, False)])
def test_crows_closer_to_50(crows_after, passed):
    # before |55.57 - 50| = 5.57; after gaps 4.24, 4.0, 6.0, 6.0 (the other side of 50 counts too)
    assert target(BEFORE, eval_results(crows=crows_after), "CrowS-Pairs")[0] is passed


def test_crows_equally_far_is_not_closer():
    assert target(eval_results(crows=55.0), eval_results(crows=45.0), "CrowS-Pairs")[0] is False


@pytest.mark.parametrize("religion, passed", [(46.0, True), (45.9, False)])
def test_no_bias_type_below_46(religion, passed):
    types = {**BALANCED, "religion": religion}
    passed_, measured = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=types), "no bias type below")
    assert passed_ is passed and measured == f"lowest religion {religion:.2f}"


def test_all_six_targets_met_and_missing_inputs_omitted():
    after = eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED, crows=52.0, ppl=20.4)
    results = check_targets(BEFORE, after)
    assert len(results) == 6 and all(passed for _, passed, _ in results)
    # after without CrowS-Pairs / perplexity, before without StereoSet
    names = [name for name, _, _ in check_targets(BEFORE, eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED))]
    assert len(names) == 4 and not any(n.startswith(("perplexity", "CrowS")) for n in names)
    names = [name for name, _, _ in check_targets(eval_results(ppl=20.0), after)]
    assert len(names) == 4 and not any(n.startswith(("LMS", "CrowS")) for n in names)


# ---------------------------------------------------------------- markdown


def test_markdown_table():
    rows = comparison_rows([("before", BEFORE), ("a|b", eval_results(ppl=21.456))])
    assert markdown_table(rows) == (
        "| run | SS | LMS | ICAT | SS gender | SS profession | SS race | SS religion | CrowS | PPL |\n"
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| before | 57.50 | 81.00 | 68.60 | 59.30 | 57.70 | 57.50 | 53.80 | 55.57 | 20.00 |\n"
        "| a\\|b | — | — | — | — | — | — | — | — | 21.46 |\n"
    )


# ---------------------------------------------------------------- command


def test_compare_command_prints_table_targets_and_writes_markdown(tmp_path):
    before = write(tmp_path / "before.json", BEFORE)
    after = write(tmp_path / "run-7.json", eval_results(ss=50.5, lms=78.0, icat=77.2, types=BALANCED, crows=52.0, ppl=20.4))
    out = tmp_path / "md" / "table.md"
    result = CliRunner().invoke(app, ["compare", f"base={before}", after, "--targets", "--markdown", str(out)])
    assert result.exit_code == 0, result.output  # a missed target is reported, not an error
    assert "base" in result.output and "run-7" in result.output  # a bare path is labelled by its stem
    assert "57.50" in result.output and "50.50" in result.output
    assert "LMS drop ≤ 2 points" in result.output and "miss" in result.output and "5 of 6 targets met" in result.output
    rows = comparison_rows([("base", load_eval(before)), ("run-7", load_eval(after))])
    assert out.read_text() == markdown_table(rows)
    assert f"wrote {out}" in result.output


@pytest.mark.parametrize("argument, message", [
    ("before={missing}", "error: {missing}: no such file"),
    ("{missing}", "error: {missing}: no such file"),
    ("before=", "error: 'before=': expected LABEL=PATH or PATH"),
    ("before={bad}", "error: {bad}: invalid JSON"),
])
def test_compare_command_bad_input_is_one_line_exit_1(tmp_path, argument, message):
    missing, bad = tmp_path / "nope.json", tmp_path / "bad.json"
    bad.write_text("{")
    result = CliRunner().invoke(app, ["compare", argument.format(missing=missing, bad=bad)])
    assert result.exit_code == 1
    assert message.format(missing=missing, bad=bad) in result.output
    assert "Traceback" not in result.output


def test_compare_targets_needs_two_runs(tmp_path):
    result = CliRunner().invoke(app, ["compare", write(tmp_path / "a.json", BEFORE), "--targets"])
    assert result.exit_code == 2 and "at least two runs" in result.output
