"""Recipes (named presets of UnlearnConfig) and the official control flow on a tiny random Llama.

Official control flow (DESIGN.md §4): all bias types together until step 100, the first decision
at step 100, then a fresh AdamW and schedule per phase, per-stream batch sizes 4 / 28 / 28.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.unlearn.config import UnlearnConfig
from amendlm.unlearn.recipes import RECIPES, recipe_fields
from amendlm.unlearn.trainer import TrainState, learning_rate
from tests.test_unlearn_trainer import interrupt_at, make_trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def log_records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]


def test_the_official_recipe_fills_the_official_settings(tmp_path):
    config = UnlearnConfig.from_recipe("official", str(tmp_path))
    assert (config.lr, config.warmup_steps, config.lora_scope) == (4e-5, 10, "attention")
    assert (config.npo_reduction, config.ce_reduction) == ("batch_sequence_mean", "sequence")  # official lm_loss
    assert [config.stream_batch_size(s) for s in ("forget", "retain", "kl", "chosen", "rejected")] == [4, 28, 28, 4, 4]
    assert [config.stream_batch_size(s, swapped=True) for s in ("forget", "retain", "kl")] == [28, 4, 28]  # train.py
    assert (config.initial_all_types_steps, config.fresh_optimizer_per_phase, config.max_steps) == (100, True, 1000)
    assert (config.val_task, config.val_clusters_per_type, config.val_clusters) == ("intrasentence", 100, None)
    assert config.recipe == "official" and config.recipe_overrides == {}
    assert (config.weight_decay, config.max_grad_norm, config.kl_texts) == (0.01, None, None)  # torch AdamW, no clipping
    # gap > 5: 3000 scheduler steps before step 400, 1000 after; evaluate every 80 / 50 / 30
    assert [(p.scheduler_steps, p.eval_every) for p in config.schedule(0)] == [(3000, 80), (200, 50), (200, 30)]
    assert config.schedule(400)[0].scheduler_steps == 1000 and config.schedule(400)[1].lr_scale == 0.8


def test_options_override_the_recipe_and_both_are_recorded(tmp_path):
    config = UnlearnConfig.from_recipe("official", str(tmp_path), {"lr": 1e-4, "kl_batch_size": 8}, dtype="auto")
    assert (config.lr, config.kl_batch_size, config.retain_batch_size, config.dtype) == (1e-4, 8, 28, "auto")
    assert config.recipe_overrides == {"lr": 1e-4, "kl_batch_size": 8}
    saved = UnlearnConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert saved == config  # recipe and overrides survive unlearn_config.json
    plain = UnlearnConfig.from_recipe("biasunlearn", str(tmp_path))
    assert plain == UnlearnConfig(out=str(tmp_path)) and plain.recipe == "biasunlearn"  # the field defaults
    assert UnlearnConfig.from_recipe("default", str(tmp_path)) == plain  # its former name, recorded as the current one


def test_a_run_recorded_under_the_former_recipe_name_resumes_and_reloads_as_the_same_config(tmp_path):
    from amendlm.unlearn.config import with_added_fields
    from amendlm.unlearn.resume import check_resume_config

    old = {**UnlearnConfig(out=str(tmp_path)).to_dict(), "recipe": "default"}
    old.pop("device")  # recorded before the field existed
    (tmp_path / "unlearn_config.json").write_text(json.dumps(old))
    check_resume_config(UnlearnConfig(out=str(tmp_path)), resume=True)  # no "different configuration"
    assert UnlearnConfig.from_dict(old) == UnlearnConfig(out=str(tmp_path))
    assert with_added_fields(old) == UnlearnConfig(out=str(tmp_path)).to_dict()


def test_an_explicit_general_option_is_not_hidden_by_the_recipes_finer_ones(tmp_path):
    config = UnlearnConfig.from_recipe("official", str(tmp_path), {"batch_size": 6, "val_clusters": 50})
    assert (config.forget_batch_size, config.retain_batch_size, config.kl_batch_size) == (None, None, None)
    assert config.batch_size == 6 and config.val_clusters == 50 and config.val_clusters_per_type is None


def test_unknown_recipes_and_choices_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"valid: biasunlearn, official, pairwise \(former names: default = biasunlearn\)"):
        recipe_fields("fastest")
    with pytest.raises(ValueError, match="valid: biasunlearn, official"):
        UnlearnConfig(out=str(tmp_path), recipe="fastest")
    with pytest.raises(ValueError, match="valid: all, attention"):
        UnlearnConfig(out=str(tmp_path), lora_scope="mlp")
    with pytest.raises(ValueError, match="kl_batch_size"):
        UnlearnConfig(out=str(tmp_path), kl_batch_size=0)
    with pytest.raises(ValueError, match="stream"):
        UnlearnConfig(out=str(tmp_path)).stream_batch_size("unrelated")
    assert recipe_fields("official") is not RECIPES["official"]  # a copy: editing it changes no preset


def test_each_phase_warms_up_again(tmp_path):
    config = UnlearnConfig(out=str(tmp_path), lr=1.0, warmup_steps=2, phase_warmup_steps=4, max_steps=100)
    first = TrainState(phase_start=0, phase_steps=100)
    assert [learning_rate(config, first, s) for s in (0, 1, 2)] == [0.5, 0.99, 0.98]
    later = TrainState(phase_start=50, phase_steps=10, lr_scale=0.8)
    assert [round(learning_rate(config, later, s), 4) for s in (50, 53, 55)] == [0.2, 0.56, 0.4]


def test_all_types_until_the_initial_steps_then_decisions(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, initial_all_types_steps=2, tolerance=1e-6, keep_best=False)
    trainer.train()
    records = log_records(tmp_path)
    evals = [r for r in records if r.get("event") == "eval"]
    assert evals[0]["step"] == 0 and "decision" not in evals[0]  # recorded, not decided on
    assert evals[1]["step"] == 2 and evals[1]["decision"]["focus"] in ("gender", "race")
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[1]["focus"] is None and steps[2]["focus"] is None  # every bias type together
    assert steps[3]["focus"] == evals[1]["decision"]["focus"]


def test_per_stream_batch_sizes(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, forget_batch_size=1, retain_batch_size=3, kl_batch_size=2)
    sizes = {name: len(batch) for name, batch in trainer._next_batches().items()}
    assert sizes == {"forget": 1, "retain": 3, "kl": 2}
    dpo = make_trainer(tmp_path / "dpo", method="dpo", max_steps=1, forget_batch_size=3, retain_batch_size=1)
    assert {name: len(batch) for name, batch in dpo._next_batches().items()} == {"chosen": 3, "rejected": 3}


@pytest.mark.parametrize("exchange", [True, False])
def test_a_swapped_phase_exchanges_forget_and_retain_batch_sizes_only_when_asked(tmp_path, exchange):
    trainer = make_trainer(tmp_path, max_steps=1, forget_batch_size=1, retain_batch_size=3, kl_batch_size=2,
                           swap_batch_sizes=exchange, adversarial_fraction=0.0)
    trainer.state.focus = trainer.train_clusters[0].bias_type
    trainer._build_streams()
    unswapped = {name: [e.ids for e in stream] for name, stream in trainer.streams.items()}
    trainer.state.swap = True
    trainer._build_streams()
    assert [e.ids for e in trainer.streams["forget"]] == unswapped["retain"]  # the anti-stereotypes are forgotten
    sizes = {name: len(batch) for name, batch in trainer._next_batches().items()}
    assert sizes == ({"forget": 3, "retain": 1, "kl": 2} if exchange else {"forget": 1, "retain": 3, "kl": 2})
    trainer.state.focus, trainer.state.swap = None, False
    trainer._build_streams()
    assert {name: len(batch) for name, batch in trainer._next_batches().items()} == {"forget": 1, "retain": 3, "kl": 2}


@pytest.mark.parametrize("fresh", [True, False])
def test_a_decision_resets_the_optimizer_only_when_asked(tmp_path, fresh):
    trainer = make_trainer(tmp_path, max_steps=2, initial_all_types_steps=2, tolerance=1e-6,
                           fresh_optimizer_per_phase=fresh, keep_best=False)
    trainer.train()
    saved = torch.load(tmp_path / "run" / "checkpoint" / "optimizer.pt", weights_only=False)
    assert (len(saved["state"]) == 0) == fresh  # the step-2 decision cleared AdamW's moments


def test_resume_after_fresh_optimizers_ends_in_the_same_weights(tmp_path):
    common = dict(max_steps=5, initial_all_types_steps=1, tolerance=1e-6, fresh_optimizer_per_phase=True,
                  warmup_steps=2, phase_warmup_steps=2, keep_best=False)
    make_trainer(tmp_path / "a", **common).train()
    reference = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    decisions = [r for r in log_records(tmp_path / "a") if "decision" in r]
    assert len(decisions) >= 2  # the optimizer was reset more than once

    first = make_trainer(tmp_path / "b", **common)
    interrupt_at(first, 3)
    assert first.train().status == "interrupted"
    result = make_trainer(tmp_path / "b", **common).train(resume=True)
    assert result.steps == 5
    weights = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-7)


def test_an_official_loss_step_without_clipping(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, npo_reduction="batch_sequence_mean", ce_reduction="sequence",
                           max_grad_norm=None, lora_dropout=0.0)
    assert trainer.train().steps == 1
    step = next(r for r in log_records(tmp_path) if "loss" in r)
    assert step["forget"] == pytest.approx(2 / 0.1 * 0.6931471805599453, rel=1e-5) and step["grad_norm"] > 0


def test_per_type_val_sample_of_one_task(tmp_path):
    from amendlm.unlearn.evaluation import per_type_sample
    from tests.test_unlearn_trainer import toy_clusters

    clusters = toy_clusters()
    picked = per_type_sample(clusters, 3, seed=0, task="intrasentence")
    assert [c.bias_type for c in picked] == ["gender"] * 3 + ["race"] * 3
    assert per_type_sample(clusters, 3, seed=0, task="intersentence") == []
    assert len(per_type_sample(clusters, 99, seed=0)) == len(clusters)  # a type with fewer gives all


def test_initial_steps_are_evaluated_every_initial_eval_every_without_decisions(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, initial_all_types_steps=4, initial_eval_every=2, tolerance=1e-6,
                           keep_best=False)
    trainer.train()
    evals = [r for r in log_records(tmp_path) if r.get("event") == "eval"]
    assert [r["step"] for r in evals][:3] == [0, 2, 4]
    assert "decision" not in evals[1] and evals[2]["decision"]["focus"] in ("gender", "race")


def test_dpo_swap_pairs_follow_the_focus_and_its_swap(tmp_path):
    trainer = make_trainer(tmp_path, method="dpo-swap", max_steps=1, adversarial_fraction=0.0)
    assert set(trainer.streams) == {"chosen", "rejected", "kl"}
    focus = trainer.train_clusters[0].bias_type
    trainer.state.focus = focus
    trainer._build_streams()
    chosen, rejected = ([e.ids for e in trainer.streams[n]] for n in ("chosen", "rejected"))
    assert len(chosen) == sum(c.bias_type == focus for c in trainer.train_clusters)
    trainer.state.swap = True
    trainer._build_streams()
    assert [e.ids for e in trainer.streams["chosen"]] == rejected  # the stereotype is now preferred
    assert [e.ids for e in trainer.streams["rejected"]] == chosen


def test_dpo_swap_runs_the_swap_schedule_and_logs_its_parts(tmp_path):
    trainer = make_trainer(tmp_path, method="dpo-swap", max_steps=3, tolerance=1e-6, keep_best=False)
    trainer.train()
    records = log_records(tmp_path)
    first = next(r for r in records if "loss" in r)
    assert first["dpo"] == pytest.approx(0.6931471805599453, rel=1e-5)  # adapter B = 0: policy = reference
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.5 * first["dpo"] + 0.3 * first["retain"] + 0.2 * first["kl"], rel=1e-5)
    assert any("decision" in r for r in records if r.get("event") == "eval")


def test_the_cli_lists_every_registered_method():
    from amendlm.unlearn.commands import METHOD_NAMES
    from amendlm.unlearn.methods import METHODS

    assert METHOD_NAMES == ", ".join(METHODS)


def test_type_focus_all_trains_every_type_and_swaps_each_below_50(tmp_path):
    trainer = make_trainer(tmp_path, method="dpo-swap", max_steps=4, type_focus="all", tolerance=1e-6, keep_best=False)
    trainer.train()
    records = log_records(tmp_path)
    decisions = [r for r in records if r.get("event") == "eval" and "decision" in r]
    assert decisions
    for record in decisions:
        types = {name: ss for name, ss in record["ss"].items() if name != "overall"}
        active = sorted(name for name, ss in types.items() if abs(ss - 50) >= 1e-6)
        assert record["decision"]["active_types"] == active and record["decision"]["focus"] is None
        assert record["decision"]["swapped_types"] == [name for name in active if types[name] < 50]
    assert all(r["focus"] is None for r in records if "loss" in r)

    fresh = make_trainer(tmp_path / "b", method="dpo-swap", max_steps=1, type_focus="all")
    chosen = [e.ids for e in fresh.streams["chosen"]]
    rejected = [e.ids for e in fresh.streams["rejected"]]
    fresh.state.swapped_types = ["race"]
    fresh._build_streams()
    race = [c.bias_type == "race" for c in fresh.train_clusters]
    assert len(fresh.streams["chosen"]) == len(chosen)  # every bias type, the same pairs
    for i, is_race in enumerate(race):
        assert fresh.streams["chosen"][i].ids == (rejected[i] if is_race else chosen[i])


def test_rest_within_is_recorded_with_each_decision(tmp_path):
    from amendlm.unlearn.schedule import types_to_train

    trainer = make_trainer(tmp_path, method="dpo-swap", max_steps=3, type_focus="all", tolerance=1e-6, keep_best=False,
                           rest_within=5.0)
    trainer.train()
    decisions = [r for r in log_records(tmp_path) if r.get("event") == "eval" and "decision" in r]
    assert decisions
    for record in decisions:
        types = {name: ss for name, ss in record["ss"].items() if name != "overall"}
        active, swapped = types_to_train(types, 1e-6, 5.0)
        assert record["decision"]["active_types"] == active and record["decision"]["swapped_types"] == swapped
        assert sorted(active + record["decision"]["resting_types"]) == sorted(t for t, ss in types.items() if ss != 50)


def test_type_focus_is_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown type_focus 'best'; valid: worst, all"):
        UnlearnConfig(out=str(tmp_path), type_focus="best")


def test_type_focus_all_leaves_out_the_types_within_the_tolerance(tmp_path):
    trainer = make_trainer(tmp_path, method="dpo-swap", max_steps=1, type_focus="all")
    trainer.state.active_types = ["gender"]
    trainer._build_streams()
    assert len(trainer.streams["chosen"]) == sum(c.bias_type == "gender" for c in trainer.train_clusters)
    assert trainer.samplers["chosen"].name == "pairs:gender:False"
    assert len(trainer.streams["kl"]) > 0  # the KL set is never restricted
