"""``amendlm debias`` errors: each names the flags typed (or the ``--config`` file's own fields) and the
condition that failed, and ``--help`` shows the values a plain run uses.

The training itself is replaced by a stub (``captured``, conftest).
"""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.unlearn.config import UnlearnConfig


def debias(tmp_path, *args):
    return CliRunner().invoke(app, ["debias", "--out", str(tmp_path / "run"), *args])


@pytest.mark.parametrize("args, says", [
    (("--rest-within", "-1"), "error: --rest-within -1 must be >= tolerance (2, "),
    (("--rest-within", "1.5"), "error: --rest-within 1.5 must be >= tolerance (2, "),
    (("--rest-within", "nan"), "error: --rest-within nan must be finite"),
    (("--recipe", "official", "--rest-within", "4"),
     "error: --rest-within 4 needs --type-focus all (--type-focus worst, from recipe official)"),
    (("--type-focus", "worst", "--rest-within", "4"), "error: --rest-within 4 needs --type-focus all (--type-focus worst, given)"),
    (("--method", "npo", "--rest-within", "4"), "error: --rest-within 4 acts only on a method with BiasUnlearn's swap "
     "control (biasunlearn, dpo-swap); --method npo has none"),  # not "needs --type-focus all": npo ignores both
    (("--max-steps", "0"), "error: --max-steps must be >= 1, got 0"),
    (("--lora-scope", "mlp"), "error: unknown --lora-scope 'mlp'; valid: all, attention"),
    (("--selection", "best"), "error: unknown --selection 'best'; valid: gap, gap_within_lms"),
    (("--type-focus", "best"), "error: unknown --type-focus 'best'; valid: worst, all"),
    (("--kl-texts", "none", "--no-kl-unrelated"),
     "error: --no-kl-unrelated with --kl-texts none leaves the KL set empty: name a text dataset in --kl-texts, or --kl-unrelated"),
    (("--schedule-scale", "0"), "error: --schedule-scale must be a finite number > 0, got 0.0"),
    (("--method", "seed"), "error: unknown --method 'seed'; valid: biasunlearn, npo, "),  # a value equal to a field's name
    (("--type-focus", "model"), "error: unknown --type-focus 'model'; valid: worst, all"),  # is the value, as typed
    (("--dtype", "fp8"), "error: unknown --dtype 'fp8'; valid: auto, "),
    (("--max-grad-norm", "-1"), "error: --max-grad-norm must be > 0, got -1.0 (--max-grad-norm 0: no clipping)"),
    (("--finetune", "full"), "error: --finetune full has no adapter to disable: use --reference copy"),
])
def test_config_errors_name_the_flags_typed_and_which_condition_failed(tmp_path, captured, args, says):
    result = debias(tmp_path, *args)
    assert result.exit_code == 2 and not captured, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(says), result.stderr


def test_a_config_file_is_blamed_only_for_its_own_fields(tmp_path, captured):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"recipe": "official", "initial_all_types_steps": 20}))
    result = debias(tmp_path, "--config", str(path), "--rest-within", "4")  # the flag is what cannot be
    assert result.exit_code == 2 and not captured, result.output
    assert result.stderr.startswith(f"error: --rest-within 4 with --config {path} (recipe official): --rest-within 4 needs "
                                    "--type-focus all (--type-focus worst, from recipe official)"), result.stderr
    path.write_text(json.dumps({"recipe": "official", "rest_within": 4.0}))  # the file alone is wrong: its fields
    result = debias(tmp_path, "--config", str(path), "--max-steps", "30")
    assert result.stderr.startswith(f"error: {path}: rest_within=4.0 needs type_focus='all' (type_focus='worst', "
                                    "from recipe official)"), result.stderr
    path.write_text(json.dumps({"type_focus": "worst"}))  # a field of the file next to a flag's
    result = debias(tmp_path, "--config", str(path), "--rest-within", "3")
    assert result.stderr.startswith(f"error: --rest-within 3 with --config {path} (recipe pairwise): --rest-within 3 needs "
                                    f"type_focus='all' (type_focus='worst', set in {path})"), result.stderr
    saved = tmp_path / "unlearn_config.json"
    saved.write_text(json.dumps(UnlearnConfig(out=str(tmp_path / "old")).to_dict()))
    result = debias(tmp_path, "--config", str(saved), "--max-steps", "0")
    assert result.stderr.startswith(f"error: --max-steps 0 with --config {saved} (recipe biasunlearn): --max-steps must be "
                                    ">= 1, got 0"), result.stderr
    assert not captured


def config_error(tmp_path, fields: dict, *args) -> str:
    """The error line of ``debias --config FILE *args`` for a hand-written FILE of ``fields`` (nothing trains:
    the model does not exist and the config is refused before it is looked at)."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps(fields))
    result = debias(tmp_path, "--config", str(path), "--model", "/nonexistent/m", *args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    return result.stderr.removeprefix("error: ").split(" (see '")[0]


def test_a_config_files_unknown_key_or_wrong_type_is_the_files_whatever_flags_are_typed(tmp_path, captured):
    path = tmp_path / "m.json"
    assert config_error(tmp_path, {"modle": "x"}) == f"{path}: unknown UnlearnConfig fields: 'modle' (did you mean 'model'?)"
    assert config_error(tmp_path, {"max_steps": "3"}, "--max-steps", "5") == f"{path}: field max_steps: expected int, got '3'"
    assert config_error(tmp_path, {"recipe_overrides": {"lr": "1e-4"}}, "--lr", "1e-3") == (
        f"{path}: recipe_overrides: field lr: expected float, got '1e-4'")
    assert not captured


def test_a_value_equal_to_a_field_name_is_never_read_as_a_field(tmp_path, captured):
    path = tmp_path / "m.json"
    assert config_error(tmp_path, {"selection": "model"}) == (
        f"{path}: unknown selection 'model'; valid: gap, gap_within_lms")  # the file's, not --model's
    assert config_error(tmp_path, {"loss_tokens": "seed"}, "--seed", "3") == (
        f"{path}: unknown loss_tokens 'seed'; valid: all, differing")
    assert not captured


def test_a_file_error_that_names_columns_is_not_blamed_on_a_flag_of_that_name(tmp_path, captured):
    path = tmp_path / "m.json"
    assert config_error(tmp_path, {"phases": [[5.0, 1.0, 100]]}, "--eval-every", "5") == (
        f"{path}: phases must be rows of [min_gap, lr_scale, scheduler_steps, eval_every], got [[5.0, 1.0, 100]]")
    assert config_error(tmp_path, {"phases": [[5.0, 1.0, 100, 0]]}, "--eval-every", "5") == (
        f"{path}: phases [[5.0, 1.0, 100, 0]]: give at least one row, each with lr_scale > 0, scheduler_steps >= 1 "
        "and eval_every >= 1")
    assert not captured


def test_a_flag_blamed_with_a_config_file_keeps_its_value(tmp_path, captured):
    path = tmp_path / "m.json"
    assert config_error(tmp_path, {"kl_unrelated": False}, "--kl-texts", "none") == (
        f"--kl-texts none with --config {path} (recipe pairwise): kl_unrelated=False with --kl-texts none leaves the "
        "KL set empty: name a text dataset in --kl-texts, or kl_unrelated=True")
    assert config_error(tmp_path, {"type_focus": "all"}, "--schedule-scale", "0") == (
        f"--schedule-scale 0 with --config {path} (recipe pairwise): --schedule-scale must be a finite number > 0, "
        "got 0.0 (it multiplies the swap schedule's step counts)")
    assert not captured


def test_the_python_caller_of_debias_config_gets_field_names():
    from amendlm.unlearn.commands import debias_config
    from amendlm.unlearn.field_errors import ConfigFieldError

    with pytest.raises(ConfigFieldError, match=r"^rest_within=4.0 needs type_focus='all' \(type_focus='worst', "
                                               r"the field default\)$") as caught:
        debias_config(Path("run"), {"rest_within": 4.0}, "official")
    assert caught.value.fields == ("rest_within", "type_focus")
    with pytest.raises(ValueError, match=r"^kl_unrelated=False with kl_texts=None leaves the KL set empty: name a text "
                                         r"dataset in kl_texts, or kl_unrelated=True$"):
        debias_config(Path("run"), {"kl_unrelated": False, "kl_texts": None})
    inert = debias_config(Path("run"), {"method": "npo"}, "pairwise")  # the recipe's rest_within: npo ignores it
    assert inert.method == "npo" and inert.rest_within == 4.0
    inert = debias_config(Path("run"), {"method": "npo", "type_focus": "worst"}, "pairwise")  # nor its other conditions
    assert inert.type_focus == "worst" and inert.rest_within == 4.0
    with pytest.raises(ConfigFieldError, match=r"^rest_within=4.0 acts only on a method with BiasUnlearn's swap control "
                                               r"\(biasunlearn, dpo-swap\); method='npo' has none$"):
        debias_config(Path("run"), {"method": "npo", "rest_within": 4.0}, "biasunlearn")


def test_the_help_shows_the_default_recipes_value_where_it_differs_and_names_only_real_flags():
    import typer.main

    from amendlm.unlearn.recipes import PAIRWISE

    params = {p.name: p for p in typer.main.get_command(app).commands["debias"].params}
    field_defaults = UnlearnConfig(out="x")
    assert params["method"].show_default == "pairwise recipe: dpo-swap"
    assert params["max_steps"].show_default == "pairwise recipe: 100; with another --method: 200"
    assert params["type_focus"].show_default == "pairwise recipe: all; with another --method: worst"
    assert params["val_clusters"].show_default == "pairwise recipe: 0; with another --method: 300"  # 0 = all
    assert params["alpha_kl"].show_default is True  # the recipe keeps the field default: shown plainly
    for field, value in PAIRWISE.items():  # every recipe value with a flag is shown, beside the field default it replaces
        if field in params:
            assert params[field].default == getattr(field_defaults, field)
            assert isinstance(params[field].show_default, str) == (value != getattr(field_defaults, field)), field
    shown = CliRunner().invoke(app, ["debias", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"}).stdout
    assert "[default: (pairwise recipe: 0.0005; with another --method: 0.0002)]" in shown
    flags = {opt for p in params.values() for opt in [*p.opts, *p.secondary_opts]} | {"--help"}
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", shown))
    assert mentioned <= flags, mentioned - flags  # e.g. no --tolerance, which debias does not have


def test_kl_text_field_reaches_the_config_and_a_missing_field_is_one_line_naming_it(tmp_path, captured, monkeypatch):
    import amendlm.modeling
    from amendlm.unlearn.progress import RunProgress

    texts = tmp_path / "wiki.jsonl"
    texts.write_text(json.dumps({"title": "A", "text": "Rain fell."}) + "\n")
    assert debias(tmp_path / "a", "--kl-texts", str(texts), "--kl-text-field", "text", "--no-progress").exit_code == 0
    assert (captured[0].kl_texts, captured[0].kl_text_field) == (str(texts), "text")
    assert captured[0].recipe_overrides == {"kl_texts": str(texts), "kl_text_field": "text"}
    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(RunProgress, "__enter__", lambda self: pytest.fail("the progress bar started"))
    result = debias(tmp_path / "b", "--kl-texts", str(texts))
    assert result.exit_code == 1 and len(captured) == 1, result.output
    assert result.stderr == (f"error: --kl-texts {texts} row 1: missing field 'document' (the row's fields: title, text); "
                             "give the field holding the text with --kl-text-field\n")


def test_the_help_states_the_stop_rules_tolerance_from_the_config_default():
    text = CliRunner().invoke(app, ["debias", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).stdout
    shown = " ".join(re.sub("[│─╭╮╰╯]", " ", text).split())  # a width set by an earlier test may wrap the panel
    tolerance = f"{UnlearnConfig(out='x').tolerance:g}"
    assert f"at least the stop rule's tolerance, {tolerance}." in shown  # --rest-within
    assert f"outside 50 ± {tolerance}, the stop rule's tolerance" in shown  # --type-focus
    assert "UnlearnConfig" not in shown
