"""``amendlm debias`` options: recipes, explicit options winning and recorded, ``--config`` merged.

The training itself is replaced by a stub that records the configuration it was given (``captured``, conftest).
"""

import json
import re

import pytest
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.unlearn.config import UnlearnConfig


def debias(tmp_path, *args):
    result = CliRunner().invoke(app, ["debias", "--out", str(tmp_path / "run"), *args])
    return result


def test_the_official_recipe_with_an_explicit_option(tmp_path, captured):
    result = debias(tmp_path, "--recipe", "official", "--lr", "1e-4", "--kl-batch-size", "8")
    assert result.exit_code == 0, result.output
    config = captured[0]
    assert (config.recipe, config.lr, config.kl_batch_size, config.retain_batch_size) == ("official", 1e-4, 8, 28)
    assert config.recipe_overrides == {"lr": 1e-4, "kl_batch_size": 8}
    assert config.dtype == "auto" and config.lora_scope == "attention" and config.initial_all_types_steps == 100


def test_every_loss_and_lora_option_reaches_the_config(tmp_path, captured):
    args = ["--alpha-forget", "0.4", "--alpha-retain", "0.5", "--alpha-kl", "0.1", "--npo-beta", "0.2",
            "--warmup-steps", "7", "--lora-r", "4", "--lora-alpha", "8", "--target-modules", "q_proj, v_proj",
            "--forget-batch-size", "2", "--retain-batch-size", "6", "--selection", "gap_within_lms",
            "--max-lms-drop", "1.5", "--loss-tokens", "differing", "--npo-reduction", "token_mean",
            "--lora-scope", "attention", "--val-clusters", "0", "--kl-texts", "none", "--ce-reduction", "sequence",
            "--max-grad-norm", "0", "--packing"]
    assert debias(tmp_path, *args).exit_code == 0
    c = captured[0]
    assert (c.alpha_forget, c.alpha_retain, c.alpha_kl, c.npo_beta, c.warmup_steps) == (0.4, 0.5, 0.1, 0.2, 7)
    assert (c.lora_r, c.lora_alpha, c.target_modules, c.lora_scope) == (4, 8, ["q_proj", "v_proj"], "attention")
    assert (c.forget_batch_size, c.retain_batch_size, c.kl_batch_size) == (2, 6, None)
    assert (c.selection, c.max_lms_drop, c.loss_tokens, c.npo_reduction) == ("gap_within_lms", 1.5, "differing", "token_mean")
    assert (c.val_clusters, c.kl_texts, c.recipe, c.ce_reduction, c.max_grad_norm) == (None, None, "pairwise", "sequence", None)
    assert c.packing is True
    assert set(c.recipe_overrides) == {a[2:].replace("-", "_") for a in args if a.startswith("--")}
    assert debias(tmp_path / "b", "--no-kl-unrelated").exit_code == 0
    assert captured[1].kl_unrelated is False and captured[1].recipe_overrides == {"kl_unrelated": False}
    result = debias(tmp_path / "c", "--no-kl-unrelated", "--kl-texts", "none")
    assert result.exit_code != 0 and "KL set empty" in re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)


def test_config_file_is_merged_with_explicit_options(tmp_path, captured):
    saved = UnlearnConfig.from_recipe("official", str(tmp_path / "old"), {"lr": 1e-4})
    path = tmp_path / "unlearn_config.json"
    path.write_text(json.dumps(saved.to_dict()))
    result = debias(tmp_path, "--config", str(path), "--max-steps", "50", "--alpha-kl", "0.4")
    assert result.exit_code == 0, result.output
    c = captured[0]
    assert (c.max_steps, c.alpha_kl, c.lr, c.retain_batch_size, c.recipe) == (50, 0.4, 1e-4, 28, "official")
    assert c.out == str(tmp_path / "run")
    assert c.recipe_overrides == {"lr": 1e-4, "max_steps": 50, "alpha_kl": 0.4}  # the saved and the new ones
    assert debias(tmp_path, "--config", str(path)).exit_code == 0
    assert captured[1].alpha_kl == 0.2 and captured[1].max_steps == 1000  # nothing given: the saved run as is


def test_a_hand_written_config_file_holds_some_fields_over_its_recipe(tmp_path, captured):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"recipe": "official", "lr": 3e-5, "initial_all_types_steps": 20}))
    result = debias(tmp_path, "--config", str(path), "--max-steps", "40")
    assert result.exit_code == 0, result.output
    c = captured[0]
    assert (c.recipe, c.lr, c.initial_all_types_steps, c.max_steps, c.retain_batch_size) == ("official", 3e-5, 20, 40, 28)
    assert c.recipe_overrides == {"lr": 3e-5, "initial_all_types_steps": 20, "max_steps": 40} and c.dtype == "auto"
    path.write_text(json.dumps({"lr": 1e-4}))
    assert debias(tmp_path, "--config", str(path)).exit_code == 0
    assert (captured[1].recipe, captured[1].lr, captured[1].max_steps) == ("pairwise", 1e-4, 100)
    path.write_text(json.dumps({"method": "npo"}))  # another method: the field defaults, as on the command line
    assert debias(tmp_path, "--config", str(path)).exit_code == 0
    assert (captured[2].recipe, captured[2].method, captured[2].lr, captured[2].max_steps) == ("biasunlearn", "npo", 2e-4, 200)


def test_without_a_recipe_debias_runs_pairwise_unless_another_method_is_named(tmp_path, captured):
    from amendlm.unlearn.recipes import PAIRWISE, cli_recipe

    assert [cli_recipe(None, None), cli_recipe(None, "dpo-swap"), cli_recipe(None, "npo"), cli_recipe(None, "biasunlearn"),
            cli_recipe("official", "npo"), cli_recipe("default", None)] == ["pairwise", "pairwise", "biasunlearn",
                                                                           "biasunlearn", "official", "biasunlearn"]
    assert debias(tmp_path / "a").exit_code == 0
    c = captured[0]
    assert (c.recipe, c.recipe_overrides, c.dtype) == ("pairwise", {}, "auto")
    assert {k: getattr(c, k) for k in PAIRWISE} == dict(PAIRWISE)
    assert debias(tmp_path / "b", "--method", "biasunlearn", "--max-steps", "50").exit_code == 0
    c = captured[1]
    assert (c.recipe, c.method, c.max_steps, c.lr, c.type_focus) == ("biasunlearn", "biasunlearn", 50, 2e-4, "worst")
    assert debias(tmp_path / "c", "--recipe", "biasunlearn").exit_code == 0
    assert (captured[2].recipe, captured[2].method) == ("biasunlearn", "biasunlearn")
    # "default", the former name, is the same recipe (old commands and saved configs mean the same run)
    assert debias(tmp_path / "c", "--recipe", "default").exit_code == 0
    assert captured[3] == captured[2]
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps({**captured[2].to_dict(), "recipe": "default"}))
    assert debias(tmp_path / "c", "--config", str(saved)).exit_code == 0 and captured[4] == captured[2]


@pytest.mark.parametrize("text, says", [("[1, 2]", "expected a JSON object"), ("{lr: 1", "not valid JSON"),
                                        ('{"lr": 1e-4, "learning_rate": 1}', "learning_rate"),
                                        ('{"initial_all_types_step": 20}', "did you mean 'initial_all_types_steps'"),
                                        ('{"kl_unrelated": "false"}', "expected bool"),
                                        ('{"lr": "3e-5"}', "expected float"),
                                        ('{"recipe_overrides": [1]}', "expected dict")])
def test_a_bad_config_file_is_one_clear_line(tmp_path, captured, text, says):
    path = tmp_path / "mine.json"
    path.write_text(text)
    result = debias(tmp_path, "--config", str(path))
    said = re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)  # rich wraps the error in a box
    assert result.exit_code != 0 and says in said and not captured
    assert "Traceback" not in result.output and (text.startswith(("[", "{lr")) or "mine.json" in said)


def test_a_missing_config_file_is_refused_by_name(tmp_path, captured):
    result = debias(tmp_path, "--config", str(tmp_path / "absent.json"))
    assert result.exit_code != 0 and "absent.json" in result.output and not captured


def test_a_hand_written_file_with_an_out_is_still_hand_written(tmp_path, captured):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"out": "elsewhere", "recipe": "official", "lr": 3e-5}))
    assert debias(tmp_path, "--config", str(path)).exit_code == 0
    c = captured[0]  # the official recipe's own fields, not the dataclass defaults under an official label
    assert (c.recipe, c.lr, c.retain_batch_size, c.max_steps, c.out) == ("official", 3e-5, 28, 1000, str(tmp_path / "run"))


def test_a_saved_config_older_than_a_field_gets_the_value_from_before_it(tmp_path, captured):
    from amendlm.unlearn.config import FIELDS_ADDED

    saved = UnlearnConfig(out=str(tmp_path / "old"), swap_batch_sizes=True, kl_unrelated=False).to_dict()
    for name in FIELDS_ADDED:
        saved.pop(name)
    path = tmp_path / "unlearn_config.json"
    path.write_text(json.dumps(saved))
    assert debias(tmp_path, "--config", str(path)).exit_code == 0
    c = captured[0]
    assert all(getattr(c, name) == value for name, value in FIELDS_ADDED.items() if name != "recipe_overrides")


def test_config_file_with_a_recipe_is_refused(tmp_path, captured):
    path = tmp_path / "unlearn_config.json"
    path.write_text(json.dumps(UnlearnConfig(out=str(tmp_path)).to_dict()))
    result = debias(tmp_path, "--config", str(path), "--recipe", "official")
    assert result.exit_code != 0 and "--recipe and --config" in result.output and not captured


def test_bad_values_name_the_valid_ones(tmp_path, captured):
    result = debias(tmp_path, "--recipe", "fastest")
    assert result.exit_code != 0 and "valid: biasunlearn, official, pairwise (former names: default = biasunlearn)" in result.output
    result = debias(tmp_path, "--loss-tokens", "some")
    assert result.exit_code != 0 and "valid: all, differing" in result.output


def test_device_is_an_option_recorded_in_the_config_and_checked_before_training(tmp_path, captured, monkeypatch):
    import torch

    assert debias(tmp_path / "a", "--device", "cpu").exit_code == 0
    assert captured[0].to_dict()["device"] == "cpu" and captured[0].recipe_overrides == {"device": "cpu"}
    assert debias(tmp_path / "b").exit_code == 0 and captured[1].device == "auto"  # as before: an accelerator if any
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, code, says in ((("--device", "cuda:1"), 2, "--device cuda:1: give the type only (cuda), no card index"),
                             (("--cpu", "--device", "cuda"), 2, "--cpu and --device cuda disagree"),
                             (("--device", "cuda"), 1, "error: --device cuda: no such accelerator on this machine"),
                             (("--device", "gpu"), 1, "--device gpu: not a device")):
        result = debias(tmp_path / "c", *args)
        assert result.exit_code == code and says in result.stderr and len(result.stderr.splitlines()) == 1, result.output
    assert len(captured) == 2 and not (tmp_path / "c").exists()


def test_progress_lines_for_steps_and_evaluations():
    from rich.console import Console

    from amendlm.unlearn.progress import RunProgress, eval_line, step_text

    step = {"step": 3, "loss": 3.5123, "forget": 13.86, "retain": 4.2101, "kl": 0.00123, "lr": 2e-4, "focus": "gender", "swap": True}
    assert step_text(step) == "loss 3.512 forget 13.9 retain 4.21 kl 0.00123 lr 2.0e-04 gender swapped"
    evaluation = {"step": 100, "event": "eval", "ss": {"gender": 60.1, "overall": 55.2, "race": 52.0},
                  "lms": {"overall": 80.1}, "lms_drop": 0.5, "worst_gap": 10.1,
                  "decision": {"stop": False, "focus": "gender", "swap": False, "gap": 10.1}}
    assert eval_line(evaluation) == ("step 100 val: SS overall 55.20 | gender 60.10 race 52.00 · LMS 80.10 "
                                     "(-0.50 from step 0) · worst gap 10.10 -> focus gender")
    console = Console(record=True, width=200, force_terminal=False)
    with RunProgress(10, console=console) as bar:
        bar(step)
        bar(evaluation)
    assert "step 100 val: SS overall 55.20" in console.export_text()


def test_debias_with_a_missing_model_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["debias", "--out", str(tmp_path / "run"), "--model", str(tmp_path / "nothing"),
                                      "--no-progress"])
    assert result.exit_code == 1
    assert "no such model directory" in result.output and "Traceback" not in result.output


def test_the_help_states_the_pairwise_recipe_values_a_plain_run_uses():
    from amendlm.unlearn.commands import debias as command
    from amendlm.unlearn.recipes import PAIRWISE

    doc = " ".join(command.__doc__.split())
    weights = " / ".join(f"{PAIRWISE[k]:g}".replace("1", "1.0", 1) if PAIRWISE[k] == 1 else f"{PAIRWISE[k]:g}"
                         for k in ("alpha_forget", "alpha_retain", "alpha_kl"))
    assert f"method {PAIRWISE['method']}, {PAIRWISE['max_steps']} steps" in doc
    assert f"{PAIRWISE['warmup_steps']} warm-up steps" in doc and f"loss weights {weights}" in doc
    assert float(doc.split("lr ")[1].split()[0]) == PAIRWISE["lr"]


def test_a_missing_kl_texts_file_is_one_line_before_the_progress_bar_and_any_model(tmp_path, monkeypatch):
    import amendlm.modeling
    from amendlm.unlearn import trainer
    from amendlm.unlearn.progress import RunProgress

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(RunProgress, "__enter__", lambda self: pytest.fail("the progress bar started"))
    result = debias(tmp_path, "--kl-texts", str(tmp_path / "no" / "file.jsonl"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(result.stderr.splitlines()) == 1
    # "--kl-texts VALUE: ...", as "--kl-texts FILE row N: ..." for a file whose rows lack the field
    assert result.stderr.startswith(f"error: --kl-texts {tmp_path / 'no' / 'file.jsonl'}: neither an embedded dataset ("), result.stderr
    missing_model = debias(tmp_path, "--model", str(tmp_path / "nothing"))  # with the progress bar on
    assert missing_model.exit_code == 1 and "no such model directory" in missing_model.stderr
    assert not (tmp_path / "run").exists()


def test_train_reads_the_kl_texts_before_loading_the_model(tmp_path, monkeypatch):
    import amendlm.modeling
    from amendlm.unlearn import trainer

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(FileNotFoundError, match="file.jsonl' is neither an embedded dataset"):
        trainer.train(UnlearnConfig(out=str(tmp_path / "run"), kl_texts=str(tmp_path / "file.jsonl")))


def test_the_per_stream_batch_sizes_show_their_default_in_the_help():
    shown = CliRunner().invoke(app, ["debias", "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
    lines = [line for line in shown.stdout.splitlines() if "-batch-size " in line and "examples per step" in line]
    assert len(lines) == 3 and all("per step. [default: (--batch-size)]" in line for line in lines), lines
    assert "per step ." not in shown.stdout
