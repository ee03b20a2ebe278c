"""experiments/: the resumable-step framework (fast), and every script in --quick mode (integration)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS_DIR))

import common  # noqa: E402  (experiments/common.py)
from ram_common import RAM_MODES  # noqa: E402


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_listed_experiment_has_a_script_and_every_script_is_listed():
    scripts = {p.stem for p in EXPERIMENTS_DIR.glob("*.py") if p.stem != "common" and not p.stem.endswith("_common")}
    assert scripts == set(common.EXPERIMENTS)


def test_step_computes_once_then_reuses_and_recomputes_on_a_changed_config(tmp_path):
    exp, _ = common.Experiment.start("demo", "Demo", ["--quick", "--results-dir", str(tmp_path)])
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    path = exp.path("demo/x.json")
    first = exp.step(path, {"lr": 1e-4, "steps": (1, 2)}, compute)
    assert first["value"] == 1 and first["step_config"] == {"lr": 1e-4, "steps": [1, 2]}
    assert first["provenance"]["quick"] is True and "machine" in first["provenance"]
    again = exp.step(path, {"lr": 1e-4, "steps": [1, 2]}, compute)  # tuple == list after JSON
    assert again["value"] == 1 and len(calls) == 1
    changed = exp.step(path, {"lr": 2e-4, "steps": [1, 2]}, compute)
    assert changed["value"] == 2 and len(calls) == 2
    assert (exp.steps_done, exp.steps_reused) == (2, 1)


def test_step_reads_a_legacy_files_own_record(tmp_path):
    exp, _ = common.Experiment.start("demo", "Demo", ["--quick", "--results-dir", str(tmp_path)])
    path = exp.path("legacy.json")
    path.write_text(json.dumps({"config": {"dtype": "bf16", "split": "test"}, "score": 61.0}))
    recorded = lambda data: data["config"]  # noqa: E731
    assert exp.step(path, {"dtype": "bf16"}, lambda: pytest.fail("must reuse"), recorded)["score"] == 61.0
    assert exp.step(path, {"dtype": "fp32"}, lambda: {"score": 1.0}, recorded)["score"] == 1.0


def test_ram_debias_cost_step_outlives_a_recipe_change_that_keeps_the_adapter_shape(tmp_path):
    from amendlm.unlearn.config import UnlearnConfig

    ram_debias = load_script("ram_debias")
    exp, _ = common.Experiment.start("demo", "Demo", ["--quick", "--results-dir", str(tmp_path)])
    budget = ram_debias.Budget(**{name: 1 for name in ram_debias.Budget._fields})
    before = UnlearnConfig.from_recipe("pairwise", "runs/pw")
    path = exp.results / "cost.json"  # a record written before the step keyed BiasUnlearn by its adapter's shape
    common.atomic_write_json(path, {"ratio": 1.5, "step_config": {
        "model": ram_debias.BASE_MODEL, "dtype": "fp32", "clusters": 1, "repeats": 1, "aligners": {},
        "biasunlearn": dataclasses.replace(before, rest_within=None).to_dict()}})

    def cost(config, compute=lambda: pytest.fail("must reuse")) -> dict:
        return ram_debias.cost_step(exp, budget, "fp32", {}, config, compute)

    assert cost(before)["ratio"] == 1.5  # rest_within does not change what is timed
    assert cost(dataclasses.replace(before, lora_r=16), lambda: {"ratio": 2.0})["ratio"] == 2.0
    assert cost(dataclasses.replace(before, lora_r=16, lr=1.0))["ratio"] == 2.0


def test_finish_writes_outputs_and_the_page_in_order(tmp_path):
    for name in ("transfer", "eval_embedded"):
        exp, _ = common.Experiment.start(name, f"Title {name}", ["--quick", "--results-dir", str(tmp_path)])
        exp.finish({"rows": [1]}, common.markdown_table(["a", "b"], [["x", 1.234], ["y", None]]))
    page = (tmp_path / "results.md").read_text()
    assert page.index("Title eval_embedded") < page.index("Title transfer")
    assert "| x | 1.23 |" in page and "| y | n/a |" in page
    assert "Regenerate: `python experiments/transfer.py --quick --results-dir" in page
    result = json.loads((tmp_path / "transfer" / "results.json").read_text())
    assert result["rows"] == [1] and result["quick"] is True


def test_the_machine_line_states_the_measured_bf16_speed_not_what_the_flags_suggest():
    flags = ["avx2", "avx512_bf16", "avx512f"]
    measured = common.describe_machine({"cpu": "Xeon", "cpu_count": 2, "cpu_flags": flags, "cpu_bf16_speedup": 0.47})
    assert measured == "Xeon, 2 cores, avx2, avx512_bf16, avx512f (bf16 autocast matmul 0.47x fp32)"
    legacy = common.describe_machine({"cpu": "Xeon", "cpu_count": 2, "cpu_flags": flags})  # recorded before the probe
    assert "native" not in legacy and legacy.endswith("(bf16 flag, speed not measured)")
    assert common.describe_machine({"cpu": "EPYC", "cpu_count": 2, "cpu_flags": ["avx2"]}).endswith("(no bf16 flag)")
    assert common.describe_machine(None) == "not recorded"
    # several records of one machine: one line with the range of its probes (timing noise), not a line per record
    xeon = {"cpu": "Xeon", "cpu_count": 2, "cpu_flags": flags}
    lines = common.describe_machines([{**xeon, "cpu_bf16_speedup": 0.56}, {**xeon, "cpu_bf16_speedup": 0.48}, None,
                                      {**xeon, "cpu_bf16_speedup": 0.5, "torch_threads": 1}, xeon])
    assert lines == sorted(["Xeon, 2 cores, avx2, avx512_bf16, avx512f (bf16 autocast matmul 0.50x fp32: median of 3 probes, "
                            "0.48-0.56x)",
                            "Xeon, 2 cores, avx2, avx512_bf16, avx512f (bf16 flag, speed not measured)", "not recorded"])
    assert common.describe_machines([{**xeon, "cpu_bf16_speedup": 0.5}]) == [measured.replace("0.47", "0.50")]


def test_quick_needs_a_results_dir():
    with pytest.raises(SystemExit):
        common.Experiment.start("demo", "Demo", ["--quick"])


@pytest.mark.integration
@pytest.mark.parametrize("name", common.EXPERIMENTS)
def test_script_runs_in_quick_mode(name, tmp_path):
    """The whole pipeline of each results table on a tiny budget, so no script rots."""
    load_script(name).main(["--quick", "--results-dir", str(tmp_path)])
    out = tmp_path / name
    assert (out / "results.json").is_file() and (out / "table.md").read_text().strip()
    assert f"python experiments/{name}.py --quick" in (tmp_path / "results.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    assert summary["quick"] is True and summary["steps"]["computed"] >= 1
    # a second run computes nothing (resumable)
    load_script(name).main(["--quick", "--results-dir", str(tmp_path)])
    assert json.loads((out / "results.json").read_text())["steps"]["computed"] == 0
    if name == "ram_xsum":  # --render-available renders what is recorded, computing nothing
        for path in {*out.glob("eval_sampled_*.json"), *out.glob("eval_*_sft-full.json")}:
            path.unlink()
        stale = out / "eval_greedy_s0_sft-lora.json"
        data = json.loads(stale.read_text())
        data["step_config"]["generate"]["max_new_tokens"] += 1
        stale.write_text(json.dumps(data))
        load_script(name).main(["--quick", "--results-dir", str(tmp_path), "--render-available"])
        partial = json.loads((out / "results.json").read_text())
        assert partial["steps"]["computed"] == 0 and not list(out.glob("eval_sampled_*.json"))
        assert partial["not_done"]["eval_sampled_s0_ram"] == "not run yet"
        assert partial["not_done"]["eval_greedy_s0_sft-lora"] == "recorded with another configuration (generate)"
        assert list(partial["decodings"]) == ["greedy"]  # nothing sampled is complete
        assert set(partial["decodings"]["greedy"]["systems"]).isdisjoint({"sft-lora", "sft-full"})
        section = (out / "section.md").read_text()
        assert "**Partial.**" in section and "--render-available" not in section
        greedy = partial["decodings"]["greedy"]  # the best mode: chosen on the val prompts, its test row read
        lever = greedy["mds_aligner_temperature"]  # quick: mds at T_e 1 (the RAM val step) and 2 (its own val step)
        assert (out / "val_greedy_s0_mds-te2.json").is_file() and set(lever["val_rougeL"]) == {"1", "2"}
        te = max(sorted(lever["val_rougeL"], key=float), key=lambda t: lever["val_rougeL"][t])  # ties: the smaller
        assert lever["chosen"] == float(te) and lever["val_rougeL"]["1"] == greedy["val"]["rougeL"]["mds"]
        assert lever["row"] == (None if te == "1" else "mds-te2") and lever["missing"] == []
        assert (out / "eval_greedy_s0_mds-te2.json").is_file() == (te == "2") == ("mds-te2" in greedy["systems"])
        candidates = (*RAM_MODES, lever["row"]) if lever["row"] else RAM_MODES
        val_modes = {m: greedy["val"]["rougeL"][m] for m in candidates}
        assert greedy["best_mode"] == max(val_modes, key=lambda m: (val_modes[m], -candidates.index(m)))
        assert greedy["val"]["n_prompts"] >= 1 and "| RAM `mds` (T_e = 2) |" in section
        assert {t["mode"] for t in greedy["targets"]} == {greedy["best_mode"]} and "ROUGE-L on val" in section
        te2 = out / "val_greedy_s0_mds-te2.json"  # a temperature's val step missing: no T_e, no mode, said so
        kept = te2.read_bytes()
        te2.unlink()
        load_script(name).main(["--quick", "--results-dir", str(tmp_path), "--render-available"])
        partial = json.loads((out / "results.json").read_text())
        assert partial["not_done"]["val_greedy_s0_mds-te2"] == "not run yet"
        assert partial["decodings"]["greedy"]["best_mode"] is None and partial["decodings"]["greedy"]["targets"] == []
        assert partial["decodings"]["greedy"]["mds_aligner_temperature"]["chosen"] is None
        assert partial["headline"][0]["value"] == "pending: val steps not done: val_greedy_s0_mds-te2"
        assert "T_e not chosen yet" in (out / "section.md").read_text()
        te2.write_bytes(kept)
        (out / "val_greedy_s0_ram.json").unlink()  # val not done: the test rows are shown, no mode is chosen
        load_script(name).main(["--quick", "--results-dir", str(tmp_path), "--render-available"])
        pending = json.loads((out / "results.json").read_text())
        assert pending["not_done"]["val_greedy_s0_ram"] == "not run yet" and pending["decodings"]["greedy"]["systems"]
        assert pending["decodings"]["greedy"]["best_mode"] is None and pending["decodings"]["greedy"]["targets"] == []
        assert pending["headline"][0]["value"] == "pending: the val step has not run"
        assert "not chosen yet" in (out / "section.md").read_text()


def test_the_ablation_lms_cost_is_lms_lost_per_ss_point_moved_towards_50():
    import unlearn_ablation

    assert unlearn_ablation.lms_cost([(0, 60.0, 80.0), (20, 57.0, 79.0), (50, 54.0, 71.0)]) == pytest.approx(1.5)
    assert unlearn_ablation.lms_cost([(0, 60.0, 80.0), (50, 44.0, 60.0)]) == pytest.approx(5.0)  # overshoot: 10 -> 6 away
    assert unlearn_ablation.lms_cost([(0, 60.0, 80.0), (50, 59.5, 79.0)]) is None  # moved < 1 point
    assert unlearn_ablation.lms_cost([(0, 60.0, 80.0)]) is None


def test_the_pairwise_recipe_is_the_ablation_row_it_was_chosen_as():
    import unlearn_ablation

    from amendlm.unlearn.recipes import recipe_fields

    assert recipe_fields("pairwise") == unlearn_ablation.LEVERS["dpo-swap-rest"]


def test_recorded_unlearning_rows_stay_reused_under_the_recipes_current_name(monkeypatch):
    """The rows in results/ were recorded with ``recipe: "default"`` (the former name of ``biasunlearn``)
    and before ``device`` existed: the scripts' configurations still match them, so nothing is retrained
    (``ensure_adapter``'s check on the run's record) or re-evaluated (``eval_step``)."""
    import unlearn_common
    import unlearn_methods

    import amendlm.bias.evaluate

    monkeypatch.setattr(unlearn_common, "ensure_adapter", lambda *a, **k: pytest.fail("a recorded run would be retrained"))
    monkeypatch.setattr(amendlm.bias.evaluate, "evaluate_model", lambda *a, **k: pytest.fail("a row would be re-evaluated"))
    monkeypatch.chdir(common.REPO)
    exp, _ = common.Experiment.start("unlearn_methods", "reuse check", [])
    legacy = []
    for run in unlearn_methods.RUNS:
        name, config = unlearn_common.unlearn_config(exp, run, "fp32")
        saved = unlearn_common.records(exp, name) / "unlearn_config.json"
        record = common.read_json(saved) if saved.is_file() else {}
        if record.get("recipe") != "default":  # recorded later (or not yet): not what this test is about
            continue
        legacy.append(name)
        assert config.recipe == "biasunlearn" and "device" not in record
        assert common.config_differences(config.to_dict(), unlearn_common._training_record(record)) == []
        unlearn_common.eval_step(exp, exp.path(f"unlearn/{name}_test.json"), unlearn_common.BASE_MODEL, "fp32",
                                 adapter=(name, config))
    assert "biasunlearn_s50_fp32" in legacy and exp.steps_reused == len(legacy)


def test_methods_rows_are_labelled_by_recipe_and_share_the_default_recipes_budget():
    import unlearn_methods

    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.recipes import recipe_fields

    official = UnlearnConfig(out="x", recipe="official", **{**recipe_fields("official"), "max_steps": 300})
    assert unlearn_methods.label_of(official) == "official recipe, 300 steps"
    assert unlearn_methods.label_of(UnlearnConfig(out="x", **recipe_fields("pairwise"))) == "default recipe (pairwise), 100 steps"
    assert unlearn_methods.label_of(UnlearnConfig(out="x", method="npo", **unlearn_methods.EQUAL_BUDGET)) == "npo, 100 steps"
    pairwise = recipe_fields("pairwise")
    baselines = [r for r in unlearn_methods.RUNS if r.options.get("method") in unlearn_methods.BASELINES]
    assert len(baselines) == len(unlearn_methods.BASELINES)
    for run in baselines:  # equal compute: the default recipe's steps, batch and val cadence
        config = UnlearnConfig(out="x", **run.options)
        assert (config.max_steps, config.batch_size) == (pairwise["max_steps"], UnlearnConfig(out="x").batch_size)
        assert config.eval_every == pairwise["phases"][0][3]


def test_methods_rows_are_named_by_run_stem_and_an_unknown_one_is_refused(tmp_path):
    import unlearn_methods

    assert len(set(unlearn_methods.ROW_NAMES)) == len(unlearn_methods.RUNS) and "official" in unlearn_methods.ROW_NAMES
    with pytest.raises(SystemExit, match="unknown row.*'nope'.*valid: biasunlearn"):
        unlearn_methods.main(["--rows", "npo,nope", "--quick", "--results-dir", str(tmp_path)])


def test_run_eval_reuses_an_evaluation_only_of_the_same_aligner(tmp_path, monkeypatch):
    """A cached evaluation of one aligner (or of the model alone) is never reused for another."""
    from amendlm.bias import evaluate
    from amendlm.product import AlignerConfig

    calls = []

    def fake_evaluate_model(model, config, adapter=None, aligner=None):
        calls.append(aligner)
        record = None if aligner is None else {"aligner": aligner.aligner, "proposal_temperature": aligner.proposal_temperature,
                                               "aligner_temperature": aligner.aligner_temperature}
        return {"model": model, "adapter": adapter, "aligner": record, "config": dataclasses.asdict(config)}

    monkeypatch.setattr(evaluate, "evaluate_model", fake_evaluate_model)
    exp, _ = common.Experiment.start("demo", "Demo", ["--quick", "--results-dir", str(tmp_path)])
    path = exp.path("demo/eval.json")
    common.run_eval(exp, path, "m", dtype="fp32")
    legacy = json.loads(path.read_text())
    del legacy["step_config"]["aligner"]  # written before pairs were scored: a single model's
    path.write_text(json.dumps(legacy))
    common.run_eval(exp, path, "m", dtype="fp32")
    assert len(calls) == 1  # reused
    # a1 and a2 do not exist: a recorded pair's evaluation is compared (and reused) before its aligner is made
    first = AlignerConfig(str(tmp_path / "a1"))
    common.run_eval(exp, path, "m", aligner=first, dtype="fp32")
    common.run_eval(exp, path, "m", aligner=AlignerConfig(str(tmp_path / "a1")), dtype="fp32")
    assert calls == [None, first]  # the model alone is not the pair; the same pair again is reused
    common.run_eval(exp, path, "m", aligner=AlignerConfig(str(tmp_path / "a2")), dtype="fp32")
    common.run_eval(exp, path, "m", aligner=AlignerConfig(str(tmp_path / "a2"), aligner_temperature=2.0), dtype="fp32")
    assert len(calls) == 4 and calls[-1].aligner_temperature == 2.0


def test_ram_xsum_keeps_the_dtype_a_run_directory_resolved_auto_to(tmp_path, monkeypatch):
    """A training or warm-up that resolved ``auto`` keeps that dtype in the step's configuration, so a
    machine that resolves ``auto`` otherwise still reuses the recorded steps (and resumes as the run does)."""
    ram_xsum = load_script("ram_xsum")
    monkeypatch.setattr(ram_xsum, "resolved_dtype", lambda dtype, device="cpu": "bf16" if dtype == "auto" else dtype)
    run = tmp_path / "small8"
    config = dataclasses.make_dataclass("C", ["out", "dtype", "device"])(str(run), "auto", "cpu")
    assert ram_xsum.Pipeline._dtype(None, config) == "bf16"  # nothing recorded: this machine's choice
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"dtype": "fp32", "dtype_auto": True}))
    assert ram_xsum.Pipeline._dtype(None, config) == "bf16"  # no checkpoint: the run would start afresh
    (run / "checkpoints" / "step-000005").mkdir(parents=True)
    (run / "checkpoints" / "step-000005" / "trainer_state.json").write_text("{}")
    assert ram_xsum.Pipeline._dtype(None, config) == "fp32"
    warm = tmp_path / "warmup8"
    warm.mkdir()
    (warm / "distill_config.json").write_text(json.dumps({"dtype": "fp32", "dtype_auto": True}))
    (warm / "distill_summary.json").write_text("{}")
    assert ram_xsum.Pipeline._dtype(None, dataclasses.replace(config, out=str(warm))) == "fp32"
    assert ram_xsum.Pipeline._dtype(None, dataclasses.replace(config, out=str(warm), dtype="fp32")) == "fp32"


def test_ram_xsum_mds_temperature_steps_are_the_ram_groups_with_mds_alone_at_another_aligner_temperature(tmp_path, capsys):
    """``mds-te{T}``: the RAM group's val (or test) evaluation with `mds` alone and the aligner at T, recorded
    beside it; the RAM group's own configuration (recorded steps) keeps the decoding's temperature."""
    import argparse

    ram_xsum = load_script("ram_xsum")
    exp, _ = common.Experiment.start("ram_xsum", "RAM", ["--quick", "--results-dir", str(tmp_path)])
    args = argparse.Namespace(proposal="p", aligner_layers=8, alpha=1e-4, aligner_lr=1e-4, lora_lr=3e-4, full_lr=2e-5,
                              dtype="fp32", train_dtype="fp32", device="cpu", render_available=False)
    pipeline = ram_xsum.Pipeline(exp, args, ram_xsum.QUICK)
    greedy = ram_xsum.decodings((0,), ["greedy"])["greedy"]
    for split in ("val", "test"):
        ram, te2 = (dataclasses.asdict(pipeline.eval_config(g, greedy, 0, split)) for g in ("ram", "mds-te2"))
        assert ram["decode"]["aligner_temperature"] == 1.0 and te2["decode"]["aligner_temperature"] == 2.0
        assert te2["systems"] == ["mds"] and te2["decode"]["proposal_temperature"] == 1.0
        assert common.config_differences(ram, te2) == ["decode", "systems"]
        assert {k: v for k, v in te2["decode"].items() if k != "aligner_temperature"} == \
            {k: v for k, v in ram["decode"].items() if k != "aligner_temperature"}
    assert pipeline.eval_path("mds-te2", "greedy", 0, "val").name == "val_greedy_s0_mds-te2.json"
    with pytest.raises(SystemExit):
        ram_xsum.main(["--quick", "--results-dir", str(tmp_path), "--aligner-temperatures", "1,0"])
    assert "--aligner-temperatures: aligner temperature '0' must be a finite number > 0" in capsys.readouterr().err


def test_ram_xsum_steps_recorded_before_training_fields_were_added_are_reused():
    """Training fields added later (at the values that reproduce old runs) neither invalidate a recorded
    training nor the evaluations that nest its configuration; a real difference still does."""
    ram_xsum = load_script("ram_xsum")
    old = {"lr": 1e-4, "eval_every": 0, "eval_fraction": 0.05}  # as recorded before pairs / zero_head existed
    expected = ram_xsum.without_added({**old, "pairs": None, "zero_head": False})
    assert common.config_differences(expected, ram_xsum.recorded_training({"step_config": old})) == []
    recorded_eval = {"step_config": {"generate": {"seed": 0}, "trained": old}}
    assert common.config_differences({"generate": {"seed": 0}, "trained": expected},
                                     ram_xsum.recorded_eval(recorded_eval)) == []
    newer = ram_xsum.without_added({**old, "pairs": {"data": "stereoset"}, "zero_head": True})
    assert common.config_differences(newer, ram_xsum.recorded_training({"step_config": old})) == ["pairs", "zero_head"]
    assert common.config_differences({"generate": {"seed": 0}, "trained": newer},
                                     ram_xsum.recorded_eval(recorded_eval)) == ["trained"]


def test_bench_decode_measures_again_when_the_aligner_changes_and_records_which_it_timed(tmp_path, monkeypatch):
    """The speed table reuses a measurement only of the same aligner: a path, or the proposal cut to K blocks."""
    import types

    script = load_script("bench_decode")
    calls = []

    def fake_measure(proposal, aligner, layers, mode, batch, prompt_tokens, new_tokens, repeats):
        calls.append((aligner, layers))
        row = {key: 1.0 for key in (
            "proposal_generate_tokens_per_s", "proposal_generate_first_token_s", "ram_tokens_per_s", "ram_first_token_s",
            "proposal_prefill_s", "aligner_prefill_s", "ram_first_token_beyond_prefills_s", "proposal_step_s",
            "aligner_step_s", "ram_step_s", "ram_step_mean_s", "step_ratio", "step_ratio_mean", "first_token_ratio",
            "public_style_loop_tokens_per_s")}
        row["first_token_ratio_floor"] = 1 + layers / 30
        return {"options": {"proposal": proposal, "aligner": aligner, "aligner_layers": layers, "mode": mode, "batch": batch,
                            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "method": 2},
                "aligner_timed": aligner or f"the proposal's first {layers} decoder blocks, untrained",
                "layers": {"proposal": 30, "aligner": layers}, "parameters": {"proposal": 1e8, "aligner": 5e7},
                "batches": {"1": row, "2": row}, "batch_speedup": 2.0, "batch_speedup_vs_public_loop": 3.0,
                "targets": {"step_ratio": 1.15, "first_token_ratio": 1.2, "batch_speedup": 4.0}}

    monkeypatch.setattr(script, "load_benchmark", lambda name: types.SimpleNamespace(measure=fake_measure, METHOD=2))
    trained = tmp_path / "small8"
    trained.mkdir()
    base = ["--results-dir", str(tmp_path / "r"), "--batch", "2"]
    sections = []
    for extra in ([], [], ["--aligner-layers", "4"], ["--aligner", str(trained)], ["--aligner", str(trained)]):
        summary = script.main(base + extra)
        sections.append((tmp_path / "r" / "bench_decode" / "section.md").read_text())
    assert calls == [(None, 8), (None, 4), (str(trained), 8)]  # the default is the 8-block cut; a repeat is reused
    assert summary["aligner_timed"] == str(trained) and f"aligner timed: `{trained}`" in sections[-1]
    assert "aligner timed: the proposal's first 8 decoder blocks, untrained" in sections[0]
    # the floor 1 + aligner prefill / proposal prefill: 1 + 8/30 is over the 1.2 target, 1 + 4/30 under it
    assert "over 1.2 at batch 1, 2: the target is out of reach there" in sections[0]
    assert "under 1.2: the target is reachable" in sections[2]
