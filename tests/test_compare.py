"""amendlm compare: rows, the BiasUnlearn targets with hand-computed numbers, markdown, the command."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amendlm.bias.compare import (TARGET_NAMES, TargetCheck, check_comparable, check_targets, comparison_rows, load_eval,
                                  markdown_table, markdown_targets)
from amendlm.bias.compare_command import parse_run
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


def target(before: dict, after: dict, prefix: str) -> TargetCheck:
    found = [check for check in check_targets(before, after) if check.name.startswith(prefix)]
    assert len(found) == 1, check_targets(before, after)
    return found[0]


def invoke(*args: str):
    """Run ``amendlm ARGS`` on a wide terminal, so that no table cell wraps whatever the real terminal."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


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
                       "ss_race": 57.5, "ss_religion": 53.8, "crows": 55.57, "ppl": 20.0,
                       "ss_ci": None, "lms_ci": None, "crows_ci": None}  # no per-unit records: no intervals
    # missing benchmarks and bias types are None
    assert rows[1] == {"run": "after", "ss": 52.0, "lms": 79.0, "icat": 75.84, "ss_gender": 48.0, "ss_profession": None,
                       "ss_race": 55.0, "ss_religion": None, "crows": None, "ppl": None,
                       "ss_ci": None, "lms_ci": None, "crows_ci": None,
                       "vs_first": {"ss": None, "lms": None, "crows": None}}


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("ss, passed", [(51.9, True), (48.0, True), (52.1, False), (47.5, False)])
def test_overall_ss_within_2(ss, passed):
    # |SS - 50|: 1.9, 2.0 (the bound is inclusive), 2.1, 2.5
    check = target(BEFORE, eval_results(ss=ss, lms=80.0, icat=70.0), "overall SS")
    assert check.passed is passed and check.value == pytest.approx(abs(ss - 50)) and check.bound == 2.0


def test_every_bias_type_within_4():
    inside = {"gender": 53.5, "profession": 47.0, "race": 50.0, "religion": 54.0}  # worst religion, gap exactly 4
    check = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=inside), "every bias type")
    assert check == TargetCheck("every bias type's SS within 50±4", True, 4.0, 4.0, "religion")
    outside = {**inside, "gender": 45.5}  # gap 4.5
    check = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=outside), "every bias type")
    assert (check.passed, check.value, check.detail) == (False, 4.5, "gender")


def test_bias_type_missing_in_after_is_a_miss_naming_it():
    # before lists four types; after only three, all balanced: targets 2 and 6 are missed because of religion
    three = {"gender": 50.0, "profession": 50.0, "race": 50.0}
    after = eval_results(ss=50.0, lms=80.0, icat=80.0, types=three)
    for prefix in ("every bias type", "no bias type below"):
        check = target(BEFORE, after, prefix)
        assert check.passed is False and check.detail.endswith("missing in after: religion"), check
    # a type after has but before lacks does not count: the targets use the types of before
    before = eval_results(ss=57.5, lms=81.0, icat=68.6, types=three)
    assert target(before, eval_results(ss=50.0, lms=80.0, icat=80.0, types={**three, "religion": 30.0}), "no bias type below").passed


@pytest.mark.parametrize("lms_after, passed", [(79.5, True), (79.0, True), (78.9, False), (83.0, True)])
def test_lms_drop_at_most_2_points(lms_after, passed):
    # 81.0 - after: drop 1.5, 2.0 (inclusive), 2.1, -2.0 (a gain)
    check = target(BEFORE, eval_results(ss=50.0, lms=lms_after, icat=70.0), "LMS drop")
    assert check.passed is passed and check.value == pytest.approx(81.0 - lms_after) and check.bound == 2.0


@pytest.mark.parametrize("ppl_after, passed", [(20.5, True), (21.0, True), (21.1, False), (18.0, True)])
def test_perplexity_increase_at_most_5_percent(ppl_after, passed):
    # 20.0 -> 20.5 is +2.5 %, 21.0 exactly +5 % (inclusive; 21/20 - 1 is 0.050000000000000044 in floats), 21.1 +5.5 %
    check = target(BEFORE, eval_results(ppl=ppl_after), "perplexity increase")
    assert check.passed is passed and check.value == pytest.approx(100 * (ppl_after / 20.0 - 1)) and check.bound == 5.0


@pytest.mark.parametrize("crows_after, passed", [(54.24, True), (46.0, True), (56.0, False), (44.0, False)])
def test_crows_closer_to_50(crows_after, passed):
    # before |55.57 - 50| = 5.57; after gaps 4.24, 4.0, 6.0, 6.0 (the other side of 50 counts too)
    check = target(BEFORE, eval_results(crows=crows_after), "CrowS-Pairs")
    assert check.passed is passed and check.value == pytest.approx(abs(crows_after - 50)) and check.bound == pytest.approx(5.57)


def test_crows_equally_far_is_not_closer():
    assert target(eval_results(crows=55.0), eval_results(crows=45.0), "CrowS-Pairs").passed is False


@pytest.mark.parametrize("religion, passed", [(46.0, True), (45.9, False)])
def test_no_bias_type_below_46(religion, passed):
    types = {**BALANCED, "religion": religion}
    check = target(BEFORE, eval_results(ss=50.0, lms=80.0, icat=80.0, types=types), "no bias type below")
    assert check == TargetCheck("no bias type below 46", passed, religion, 46.0, "religion")


def test_all_six_targets_met_and_missing_inputs_are_not_available():
    after = eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED, crows=52.0, ppl=20.4)
    checks = check_targets(BEFORE, after)
    assert [c.name for c in checks] == list(TARGET_NAMES) and all(c.passed is True for c in checks)
    # after without CrowS-Pairs / perplexity: those two are n/a, still listed
    checks = {c.name: c for c in check_targets(BEFORE, eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED))}
    assert len(checks) == len(TARGET_NAMES)
    assert checks["perplexity increase ≤ 5%"] == TargetCheck("perplexity increase ≤ 5%", None, None, 5.0, "no perplexity in after")
    assert checks["CrowS-Pairs closer to 50 than before"].passed is None
    # before without StereoSet: LMS and both per-type targets are n/a, overall SS (after only) is not
    checks = {c.name: c for c in check_targets(eval_results(ppl=20.0), after)}
    assert [name for name, c in checks.items() if c.passed is None] == [
        "every bias type's SS within 50±4", "LMS drop ≤ 2 points", "CrowS-Pairs closer to 50 than before", "no bias type below 46"]
    assert checks["LMS drop ≤ 2 points"].detail == "no StereoSet in before"


# ---------------------------------------------------------------- comparable runs


def with_fields(results: dict, **changes) -> dict:
    """A deep copy of ``results`` with dotted fields set, e.g. ``{"benchmarks.stereoset.split": "all"}``."""
    results = json.loads(json.dumps(results))
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = results
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return results


RECORDED = with_fields(BEFORE, **{
    "config.limit": None, "benchmarks.stereoset.data_sha256": "aa", "benchmarks.crows-pairs.data_sha256": "bb",
    "benchmarks.perplexity.data_sha256": "cc", "benchmarks.perplexity.window": 512, "benchmarks.perplexity.stride": 256,
})


@pytest.mark.parametrize("field, value, message", [
    ("benchmarks.stereoset.split", "all", "after.json: benchmarks.stereoset.split 'all' differs from before.json 'test'"),
    ("benchmarks.stereoset.split_seed", 1, "after.json: benchmarks.stereoset.split_seed 1 differs from before.json 0"),
    ("config.limit", 20, "after.json: config.limit 20 differs from before.json None"),
    ("benchmarks.stereoset.data_sha256", "ff", "after.json: benchmarks.stereoset.data_sha256 'ff' differs from before.json 'aa'"),
    ("benchmarks.crows-pairs.data_sha256", "ff", "benchmarks.crows-pairs.data_sha256 'ff' differs"),
    ("benchmarks.perplexity.data_sha256", "ff", "benchmarks.perplexity.data_sha256 'ff' differs"),
    ("benchmarks.perplexity.window", 1024, "after.json: benchmarks.perplexity.window 1024 differs from before.json 512"),
    ("benchmarks.perplexity.stride", 128, "benchmarks.perplexity.stride 128 differs"),
])
def test_runs_on_different_data_or_settings_are_refused(field, value, message):
    with pytest.raises(ValueError) as raised:
        check_targets(RECORDED, with_fields(RECORDED, **{field: value}), "before.json", "after.json")
    assert message in str(raised.value)


def test_model_and_adapter_may_differ_and_unshared_benchmarks_are_not_compared():
    after = with_fields(RECORDED, **{"model": "other", "adapter": "runs/x", "config.dtype_auto": True})
    check_comparable(RECORDED, after)
    # after without perplexity: its window is not compared
    check_comparable(RECORDED, {**after, "benchmarks": {k: v for k, v in after["benchmarks"].items() if k != "perplexity"}})


@pytest.mark.parametrize("field, value", [("config.dtype", "bf16"), ("start_token.id", 2)])
def test_dtype_and_start_token_must_match(field, value):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_comparable(with_fields(RECORDED, **{field: "fp32" if field == "config.dtype" else 1}),
                         with_fields(RECORDED, **{field: value}))


# ---------------------------------------------------------------- markdown


def test_markdown_table():
    rows = comparison_rows([("before", BEFORE), ("a|b", eval_results(ppl=21.456))])
    assert markdown_table(rows) == (
        "| run | SS | LMS | ICAT | SS gender | SS profession | SS race | SS religion | CrowS | PPL |\n"
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| before | 57.50 | 81.00 | 68.60 | 59.30 | 57.70 | 57.50 | 53.80 | 55.57 | 20.00 |\n"
        "| a\\|b | — | — | — | — | — | — | — | — | 21.46 |\n"
    )


def test_markdown_targets():
    checks = [TargetCheck(TARGET_NAMES[0], False, 5.88, 2.0, ""), TargetCheck(TARGET_NAMES[2], True, 0.79, 2.0, ""),
              TargetCheck(TARGET_NAMES[5], None, None, 46.0, "no per-type SS in after|x")]
    assert markdown_targets(checks, "before", "after") == (
        "BiasUnlearn targets: before → after (SS, LMS, CrowS in points; perplexity increase in %)\n\n"
        "| target | result | value | bound | detail |\n"
        "|:---|:---|---:|---:|:---|\n"
        "| overall SS within 50±2 | **missed** | 5.88 | 2.00 |  |\n"
        "| LMS drop ≤ 2 points | met | 0.79 | 2.00 |  |\n"
        "| no bias type below 46 | n/a | — | 46.00 | no per-type SS in after\\|x |\n\n"
        "1 of 3 targets met (1 n/a)\n")


# ---------------------------------------------------------------- command


@pytest.mark.parametrize("argument, expected", [
    ("before=runs/a.json", ("before", "runs/a.json")),
    ("runs/a.json", ("a", "runs/a.json")),
    ("runs/lr=1e-4/eval.json", ("eval", "runs/lr=1e-4/eval.json")),  # '/' before the '=': a path
    ("x=runs/lr=1e-4/eval.json", ("x", "runs/lr=1e-4/eval.json")),  # split at the first '=' only
    ("./a=b.json", ("a=b", "./a=b.json")),
    (" base = a.json", ("base", " a.json")),
])
def test_parse_run(argument, expected):
    label, path = parse_run(argument)
    assert (label, path) == (expected[0], Path(expected[1]))


@pytest.mark.parametrize("argument", ["=a.json", "before=", " =a.json"])
def test_parse_run_rejects_an_empty_label_or_path(argument):
    with pytest.raises(ValueError, match="expected LABEL=PATH or PATH"):
        parse_run(argument)


def test_compare_command_prints_table_targets_and_writes_markdown(tmp_path):
    before = write(tmp_path / "before.json", BEFORE)
    after = write(tmp_path / "run-7.json", eval_results(ss=50.5, lms=78.0, icat=77.2, types=BALANCED, crows=52.0, ppl=20.4))
    out = tmp_path / "md" / "table.md"
    result = invoke("compare", f"base={before}", after, "--targets", "--markdown", str(out))
    assert result.exit_code == 0, result.output  # a missed target is reported, not an error
    assert "base" in result.output and "run-7" in result.output  # a bare path is labelled by its stem
    assert "57.50" in result.output and "50.50" in result.output
    assert "LMS drop ≤ 2 points" in result.output and "miss" in result.output and "5 of 6 targets met" in result.output
    rows = comparison_rows([("base", load_eval(before)), ("run-7", load_eval(after))])
    checks = check_targets(load_eval(before), load_eval(after))
    assert out.read_text() == markdown_table(rows) + "\n" + markdown_targets(checks, "base", "run-7")  # what it printed
    assert f"wrote {out}" in result.output


def test_compare_command_counts_not_available_targets_and_strict_fails_on_them(tmp_path):
    before = write(tmp_path / "before.json", BEFORE)
    met = write(tmp_path / "met.json", eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED, crows=52.0, ppl=20.4))
    partial = write(tmp_path / "partial.json", eval_results(ss=50.5, lms=80.0, icat=79.2, types=BALANCED))
    result = invoke("compare", before, partial, "--targets")
    assert result.exit_code == 0, result.output
    assert "4 of 6 targets met (2 n/a" in result.output and "n/a" in result.output
    assert invoke("compare", before, partial, "--targets", "--strict").exit_code == 1
    strict = invoke("compare", before, met, "--targets", "--strict")
    assert strict.exit_code == 0 and "6 of 6 targets met" in strict.output


def test_compare_command_strict_fails_on_a_miss_after_writing_the_markdown(tmp_path):
    before = write(tmp_path / "before.json", BEFORE)
    after = write(tmp_path / "after.json", eval_results(ss=55.0, lms=80.0, icat=72.0, types=BALANCED, crows=52.0, ppl=20.4))
    out = tmp_path / "table.md"
    result = invoke("compare", before, after, "--targets", "--strict", "--markdown", str(out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "5 of 6 targets met" in result.output and out.is_file()


def test_compare_command_refuses_a_label_given_twice(tmp_path):
    before, after = write(tmp_path / "before.json", BEFORE), write(tmp_path / "after.json", BEFORE)
    result = invoke("compare", f"before={before}", f"before={after}", "--targets")
    assert result.exit_code == 1 and "error: the label 'before' names 2 runs: give each run its own LABEL=PATH" in result.output
    assert "amendlm eval results" not in result.output
    assert invoke("compare", str(before), f"b={after}").exit_code == 0  # labels "before" and "b"


def test_compare_command_refuses_runs_that_are_not_comparable(tmp_path):
    before = write(tmp_path / "before.json", RECORDED)
    after = write(tmp_path / "after.json", with_fields(RECORDED, **{"benchmarks.stereoset.split": "all"}))
    result = invoke("compare", before, after, "--targets")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"error: {after}: benchmarks.stereoset.split 'all' differs from {before} 'test'" in result.output
    assert "amendlm eval results" not in result.output  # refused before any table is printed
    assert invoke("compare", before, after).exit_code == 0  # the plain table does not check


@pytest.mark.parametrize("argument, message", [
    ("before={missing}", "error: {missing}: no such file"),
    ("{missing}", "error: {missing}: no such file"),
    ("before=", "error: 'before=': expected LABEL=PATH or PATH"),
    ("before={bad}", "error: {bad}: invalid JSON"),
])
def test_compare_command_bad_input_is_one_line_exit_1(tmp_path, argument, message):
    missing, bad = tmp_path / "nope.json", tmp_path / "bad.json"
    bad.write_text("{")
    result = invoke("compare", argument.format(missing=missing, bad=bad))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not an uncaught exception
    assert message.format(missing=missing, bad=bad) in result.output


@pytest.mark.parametrize("args, message", [
    (["--targets"], "at least two runs"),
    (["--strict"], "--strict applies to --targets"),
])
def test_compare_usage_errors(tmp_path, args, message):
    result = invoke("compare", write(tmp_path / "a.json", BEFORE), *args)
    assert result.exit_code == 2 and message in result.output
