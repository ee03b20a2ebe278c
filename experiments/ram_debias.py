"""Debiasing a frozen model at inference time with a RAM aligner, against BiasUnlearn, on the held-out test targets.

Rows, each evaluated with ``amendlm.bias.evaluate.evaluate_model`` on the StereoSet **test** target terms,
CrowS-Pairs and WikiText perplexity (95 % bootstrap intervals, ``amendlm compare``'s rows):

1. the embedded model alone (``results/unlearn/base_test_<dtype>.json``, shared with ``unlearn_methods.py``);
2. BiasUnlearn with the default recipe (``pairwise``, 100 steps): the very run and evaluation of
   ``unlearn_methods.py`` / ``unlearn_ablation.py`` (reused, trained only if missing);
3. RAM-debias: the model frozen, times an aligner trained by ``align train --pairs stereoset`` on the
   StereoSet **train** targets (chosen = anti-stereotype, rejected = stereotype), its head started at
   zero (the pair starts as the model), a KL(model || pair) regulariser on neutral text, the aligner
   kept by the val-target rule of BiasUnlearn (smallest worst type gap among evaluations within 2 LMS
   points of step 0): a small aligner (the model's first K blocks, all weights; reference-free DPO, and
   the residual loss) and a full-size copy with LoRA (DPO); scored as the ``mds`` product
   ``softmax(b + a)`` (``amendlm eval --aligner``).

Also: trainable parameters, training seconds, inference cost relative to the model alone (scoring
seconds, measured in one process), the BiasUnlearn targets of every row, each RAM run's val
trajectory, and a generation check (seeded continuations of a few test contexts from the model alone
and from the pair with ``par-kl`` and ``mds``).

    python experiments/ram_debias.py                                   # fp32; about 2 hours on 2 idle cores
    python experiments/ram_debias.py --quick --results-dir /tmp/rd      # tiny budgets, about 2 minutes (idle)

The estimate: one training step of the small aligner (16 pairs + 8 neutral examples) took about 7
CPU-seconds on one thread, one of the LoRA copy about 15; scoring one val cluster with the pair about
0.17 / 0.26 CPU-seconds (863 val clusters per evaluation, 7 evaluations per run); plus each pair's
test evaluation (about 1.5x / 2x the model's own).

Resumable: every training, evaluation, the cost measurement and the generation check are steps reused
when their recorded configuration matches; trainings resume from their checkpoints.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

from common import Experiment, eval_defaults, eval_expected, eval_recorded, resolved_dtype
from eval_common import training_seconds
from ram_debias_common import (cost_table, generate_check, generation_contexts, generation_markdown, measure_cost,
                               recorded_max_lms_drop, ss_targets_missed, val_table, why_missed)
from unlearn_common import (BASE_MODEL, KeptBaseModel, base_eval, describe_test_set, enter_repo, eval_options, eval_step,
                            pairwise_run, read_json, records, runs_root, target_checks, targets_table, unlearn_config)


class Budget(NamedTuple):
    """How much every RAM training uses."""

    layers: int  # K, the small aligner's blocks
    max_steps: int
    batch_size: int  # pairs per step
    val_every: int
    val_clusters: int | None  # per val evaluation (None: all val clusters)
    kl_batch_size: int
    pair_limit: int | None  # training pairs (None: every train-target cluster)
    kl_text_limit: int | None
    cost_clusters: int  # test clusters timed for the inference cost
    cost_repeats: int
    generation_tokens: int
    contexts_per_type: int  # of each task


FULL = Budget(8, 150, 16, 25, None, 8, None, 50, 200, 2, 16, 1)
QUICK = Budget(1, 2, 2, 1, 4, 2, 8, 2, 3, 1, 4, 1)
# the aligner runs: (loss, LoRA on a full-size copy?); quick runs only the two DPO rows
RUNS = {"small-dpo": ("dpo", False), "small-residual": ("residual", False), "lora-dpo": ("dpo", True)}
QUICK_RUNS = ("small-dpo", "lora-dpo")


def label_of(row: str, budget: Budget) -> str:
    """The table's name of a RAM row, e.g. ``RAM-debias small (8 blocks), DPO``."""
    loss, lora = RUNS[row]
    size = "full-size copy, LoRA" if lora else f"small ({budget.layers} blocks)"
    return f"RAM-debias {size}, {'DPO' if loss == 'dpo' else 'residual'}"


def train_config(exp: Experiment, row: str, args, budget: Budget):
    """The ``TrainConfig`` of one RAM row (what ``align train --pairs stereoset`` with the options below does)."""
    from amendlm.ram.losses import LossConfig
    from amendlm.ram.preference import PairsConfig
    from amendlm.ram.train import TrainConfig

    loss, lora = RUNS[row]
    pairs = PairsConfig(limit=budget.pair_limit, kl_weight=args.kl_weight, kl_unrelated=not args.no_kl_unrelated,
                        kl_batch_size=budget.kl_batch_size,
                        kl_text_limit=budget.kl_text_limit, val_every=budget.val_every, val_clusters=budget.val_clusters)
    size = dict(aligner=BASE_MODEL, lora=True, learning_rate=args.lora_lr) if lora else \
        dict(init_from_proposal_layers=budget.layers, learning_rate=args.small_lr)
    return TrainConfig(out=f"{runs_root(exp)}/ram_debias/{row}_{args.train_dtype}",
                       pairs=pairs, zero_head=True, proposal=BASE_MODEL,
                       loss=LossConfig(name=loss, beta=args.beta, alpha=args.alpha, per_token=True),
                       max_steps=budget.max_steps, batch_size=budget.batch_size, save_every=budget.val_every,
                       log_every=1 if exp.quick else 5, dtype=args.train_dtype, **size)


def train_expected(config) -> dict:
    """What defines a training step: its ``TrainConfig`` with the dtype resolved on this machine."""
    return {**asdict(config), "dtype": resolved_dtype(config.dtype, config.device)}


def trained(exp: Experiment, row: str, config) -> dict:
    """One RAM training as a step: its summary (with the val selection), recorded configuration and log."""
    from amendlm.ram.train import train_aligner
    from amendlm.unlearn.artifacts import read_log

    def compute():
        summary = train_aligner(config)
        out = Path(config.out)
        return {"summary": summary, "train_config": read_json(out / "train_config.json"), "log": read_log(out / "train_log.jsonl")}

    return exp.step(exp.results / f"train_{row}.json", train_expected(config), compute)


def pair_eval(exp: Experiment, row: str, config, dtype: str) -> tuple[Path, dict]:
    """The pair (the model x the row's aligner) on the test targets, reused when the evaluation settings, the
    aligner and the training that made it (``upstream.training``) match; trains first if the aligner is missing."""
    from amendlm.bias.evaluate import EvalConfig, evaluate_model
    from amendlm.product import AlignerConfig
    from amendlm.ram.train import train_aligner

    path = exp.results / f"{row}_test.json"
    eval_config = EvalConfig(**{"progress": False, **eval_options(exp, dtype)})
    aligner = AlignerConfig(f"{config.out}/aligner")
    expected = {**eval_expected(BASE_MODEL, None, eval_config, aligner), "upstream.training": train_expected(config)}

    def compute():
        train_aligner(config)  # nothing to do when the run is finished
        return evaluate_model(BASE_MODEL, replace(eval_config, dtype=expected["dtype"]), aligner=aligner)

    return path, exp.step(path, expected, compute, recorded=eval_recorded, defaults=eval_defaults())


ADAPTER_SHAPE = ("model", "finetune", "lora_r", "target_modules", "lora_scope")


def adapter_shape(unlearn_config: dict) -> dict:
    """The fields of a recorded ``UnlearnConfig`` that fix its adapter's parameter count (the only thing the
    cost step measures of BiasUnlearn): a change of recipe that keeps them keeps the timed cost valid."""
    return {name: unlearn_config.get(name) for name in ADAPTER_SHAPE}


def cost_recorded(data: dict) -> dict:
    """The cost step's recorded configuration, BiasUnlearn's part cut to :func:`adapter_shape` (records
    written before it kept the whole configuration)."""
    recorded = dict(data.get("step_config", {}))
    if "biasunlearn" in recorded:
        recorded["biasunlearn"] = adapter_shape(recorded["biasunlearn"])
    return recorded


def cost_step(exp: Experiment, budget: Budget, dtype: str, configs: dict, bu_config, compute) -> dict:
    """The inference-cost step: defined by the timing budget, the aligners' trainings (``configs``: row ->
    ``TrainConfig``) and BiasUnlearn's :func:`adapter_shape` (``bu_config``: an ``UnlearnConfig``)."""
    expected = {"model": BASE_MODEL, "dtype": dtype, "clusters": budget.cost_clusters, "repeats": budget.cost_repeats,
                "aligners": {row: train_expected(config) for row, config in configs.items()},
                "biasunlearn": adapter_shape(bu_config.to_dict())}
    return exp.step(exp.results / "cost.json", expected, compute, recorded=cost_recorded)


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, format_cell, markdown_table as compare_table
    from amendlm.ram.train import train_aligner
    from amendlm.unlearn.artifacts import read_log

    def options(parser):
        parser.add_argument("--dtype", default="fp32", help="Evaluation dtype (fp32: as the other tables' rows).")
        parser.add_argument("--train-dtype", default="fp32",
                            help="Training and val dtype: fp32 (exact; bf16 autocast was not faster at these short sequences), bf16 or auto.")
        parser.add_argument("--rows", default=",".join(RUNS), help=f"RAM rows among {', '.join(RUNS)}.")
        parser.add_argument("--small-lr", type=float, default=1e-4, help="AdamW LR of the small aligner (all weights).")
        parser.add_argument("--lora-lr", type=float, default=5e-4, help="AdamW LR of the LoRA aligner (the pairwise recipe's).")
        parser.add_argument("--beta", type=float, default=1.0, help="DPO beta (RAM's preference variant: 1).")
        parser.add_argument("--alpha", type=float, default=0.1, help="Residual loss: weight of the stereotype term.")
        parser.add_argument("--kl-weight", type=float, default=1.0, help="Weight of KL(model || pair) on neutral text.")
        parser.add_argument("--no-kl-unrelated", action="store_true",
                            help="Neutral text without StereoSet's unrelated sentences (general text only).")

    exp, args = Experiment.start("ram_debias", "Debiasing at inference time with a RAM aligner vs BiasUnlearn (held-out test targets)",
                                 argv, options)
    enter_repo(exp)
    budget = QUICK if exp.quick else FULL
    dtype = resolved_dtype(args.dtype)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose among {', '.join(RUNS)}")
    ram_rows = [r for r in rows_wanted if r in QUICK_RUNS] if exp.quick else rows_wanted

    base_path, base = base_eval(exp, dtype)
    bu_name, bu_config = unlearn_config(exp, pairwise_run(), dtype)
    bu_path = exp.path(f"unlearn/{bu_name}_test.json")
    try:
        bu = eval_step(exp, bu_path, BASE_MODEL, dtype, adapter=(bu_name, bu_config))
    except KeptBaseModel:  # the selection kept step 0: the row is the base model
        bu = base
    bu_summary = read_json(records(exp, bu_name) / "summary.json")
    bu_label = f"BiasUnlearn default recipe (pairwise), {bu_config.max_steps} steps"
    runs, sources = [("base (the model alone)", base), (bu_label, bu)], [base_path, bu_path, records(exp, bu_name) / "summary.json"]
    checks = {bu_label: target_checks(base, bu, base_path.name, bu_path.name)}
    configs, trainings, labels = {}, {}, {}
    for row in ram_rows:
        config = train_config(exp, row, args, budget)
        configs[row], trainings[row], labels[row] = config, trained(exp, row, config), label_of(row, budget)
        path, data = pair_eval(exp, row, config, dtype)
        runs.append((labels[row], data))
        sources += [path, exp.results / f"train_{row}.json"]
        checks[labels[row]] = target_checks(base, data, base_path.name, path.name)

    aligners = {row: f"{configs[row].out}/aligner" for row in ram_rows}

    def measured_cost() -> dict:
        for row in ram_rows:
            train_aligner(configs[row])  # nothing to do for a finished run
        return measure_cost(BASE_MODEL, aligners, budget.cost_clusters, budget.cost_repeats, dtype, bu_config)

    cost = cost_step(exp, budget, dtype, {row: configs[row] for row in ram_rows}, bu_config, measured_cost)
    # the generation check uses the RAM run whose kept val evaluation has the smallest worst type gap (val, not test)
    kept = {row: trainings[row]["summary"]["selection"]["kept"] for row in ram_rows}
    chosen = min(ram_rows, key=lambda r: (kept[r]["worst_gap"], ram_rows.index(r))) if ram_rows else None
    contexts = generation_contexts(budget.contexts_per_type)
    generation = None
    if chosen is not None:
        def generated() -> dict:
            train_aligner(configs[chosen])
            return generate_check(BASE_MODEL, aligners[chosen], contexts, budget.generation_tokens, 0)

        gen_expected = {"model": BASE_MODEL, "training": train_expected(configs[chosen]), "contexts": contexts,
                        "max_new_tokens": budget.generation_tokens, "seed": 0, "full_distribution": ["proposal", "mds"],
                        "stop": []}
        generation = exp.step(exp.results / "generations.json", gen_expected, generated)
    sources += [exp.results / "cost.json"] + ([exp.results / "generations.json"] if generation else [])

    rows = comparison_rows(runs)
    # (seconds, lower bound?) of each training: a resumed run may have recorded only part of its seconds
    seconds = {r: training_seconds(trainings[r]["summary"], trainings[r]["log"]) for r in ram_rows}
    bu_seconds = training_seconds(bu_summary, read_log(records(exp, bu_name) / "log.jsonl"), per_step=True)
    cost_rows = {"base (the model alone)": {"trainable": 0, "train_seconds": None, "cost": "1.00", "cost_params": "1.00", "kept": ""},
                 bu_label: {"trainable": cost["biasunlearn_trainable"], "train_seconds": bu_seconds[0],
                            "train_seconds_lower_bound": bu_seconds[1],
                            "cost": "1.00 (adapter merged)", "cost_params": "1.00", "kept": str(bu_summary.get("weights_saved"))}}
    for row in ram_rows:
        measured = cost["pairs"][row]
        cost_rows[labels[row]] = {"trainable": trainings[row]["train_config"].get("trainable_parameters"),
                                  "train_seconds": seconds[row][0], "train_seconds_lower_bound": seconds[row][1],
                                  "cost": f"{measured['ratio']:.2f}",
                                  "cost_params": f"{measured['parameter_ratio']:.2f}", "kept": f"step {kept[row]['step']}"}
    trajectories = {labels[r]: [x for x in trainings[r]["log"] if x.get("event") == "val"] for r in ram_rows}
    markdown = "\n".join([
        compare_table(rows),
        f"BiasUnlearn targets of each row against `{base_path.name}` (in brackets the quantity each target bounds):",
        "",
        targets_table(checks),
        "Cost (trainable parameters; training seconds as recorded, in-training val evaluations included, ≥ when a "
        "resumed run recorded only part of them; scoring "
        f"seconds of {cost['n_clusters']} test clusters with the pair over the model alone, best of {cost['repeats']}, "
        "one process):",
        "",
        cost_table(cost_rows),
        "",
        "Val-target evaluations during training (they chose the kept aligner; pair scored as in the table):",
        "",
        val_table(trajectories, {labels[r]: kept[r]["step"] for r in ram_rows}),
    ])
    groups = base["benchmarks"]["stereoset"]["scores"]["overall"]
    base_val = next((t[0]["ss"]["overall"] for t in trajectories.values() if t), float("nan"))
    by_run = {row["run"]: row for row in rows}
    missed = ""
    if ss_targets_missed({labels[r]: checks[labels[r]] for r in ram_rows}):
        missed = why_missed(trajectories, {labels[r]: kept[r]["step"] for r in ram_rows},
                            {labels[r]: recorded_max_lms_drop(trainings[r]["train_config"]) for r in ram_rows},
                            {labels[r]: by_run[labels[r]]["ss"] for r in ram_rows if by_run[labels[r]]["ss"] is not None},
                            (base_val, by_run[runs[0][0]]["ss"]),
                            {t: (g["n_targets"], g["n_clusters"]) for t, g in groups.items() if t != "overall"})
    if missed:
        markdown += "\n\n" + missed
    blocks = {"ram_debias.table": compare_table(rows).rstrip() + "\n\n" + targets_table(checks).rstrip()
              + ("\n\n" + missed if missed else "") + "\n\nCost:\n\n" + cost_table(cost_rows).rstrip()}
    if generation:
        blocks["ram_debias.generations"] = (
            f"Seeded continuations (T 1, seed 0, {budget.generation_tokens} tokens, raw text, line breaks shown as "
            f"spaces) of StereoSet test contexts, the model alone and the pair with `{labels[chosen]}` (the RAM run with "
            "the smallest kept val gap); the model alone and `mds` draw from their full distributions (those the table "
            "scores), `par-kl` keeps its nucleus rules:\n\n" + generation_markdown(generation, "pair"))
        markdown += "\n\nGeneration check: " + blocks["ram_debias.generations"]
    notes = describe(configs, trainings, args, budget, base, cost)
    summary = {"dtype": dtype, "rows": rows, "targets": checks, "cost": cost, "budget": budget._asdict(),
               "trainings": {r: {"config": train_expected(configs[r]), "selection": trainings[r]["summary"].get("selection"),
                                 "seconds": seconds[r][0], "seconds_lower_bound": seconds[r][1]} for r in ram_rows},
               "generation_row": chosen, "biasunlearn": {"run": bu_name, "config": bu_config.to_dict()}}
    headline = []
    if chosen is not None:
        before, after = by_run[runs[0][0]], by_run[labels[chosen]]
        met = sum(c["passed"] is True for c in checks[labels[chosen]])
        headline.append((f"{labels[chosen]} (chosen on val: smallest kept worst-type gap; inference-time debiasing, "
                         "model frozen) vs the model alone, held-out test "
                         f"targets ({dtype}): SS / LMS / CrowS / perplexity (95 % CI in brackets)",
                         " / ".join(f"{before[k]:.2f} → {format_cell(after, k)}" for k in ("ss", "lms", "crows"))
                         + f" / {before['ppl']:.2f} → {after['ppl']:.2f}; {met} of {len(checks[labels[chosen]])} targets met"))
    exp.finish(summary, markdown, notes=notes, sources=sources, headline=headline, readme_blocks=blocks)
    return summary


def describe(configs: dict, trainings: dict, args, budget: Budget, base: dict, cost: dict) -> str:
    """The settings in words, from the configurations and the training records."""
    lines = [f"Test set: {describe_test_set(base)}; every row evaluated in {base['config']['dtype']}, "
             f"examples per benchmark: {base['config']['limit'] or 'all'}.  The pair is scored as `softmax(b + a)` over the "
             "shared vocabulary (`amendlm eval --aligner`); the nucleus rules (`par`, `par-kl`) put no mass outside the "
             "model's nucleus, so they have no finite sentence scores and appear only in the generation check."]
    for row, config in configs.items():
        record = trainings[row]["train_config"]
        pairs = config.pairs
        what = (f"a full-size copy of `{BASE_MODEL}` with LoRA r {config.lora_r} on every projection and the head"
                if config.lora else f"the first {config.init_from_proposal_layers} blocks of `{BASE_MODEL}` (+ embeddings, "
                "final norm, its own head), all weights")
        lines.append(
            f"`{row}`: {what}, head started at zero; {config.loss.name} loss (per-token log-probs, "
            + (f"β {config.loss.beta:g}" if config.loss.name == "dpo" else f"α {config.loss.alpha:g}")
            + f") on {record.get('n_examples')} StereoSet train-target pairs ({record.get('n_heldout')} held out for the "
            f"held-out loss), batch {config.batch_size}, {config.max_steps} steps, lr {config.learning_rate:g}, "
            f"{record.get('dtype')}; + {pairs.kl_weight:g} × KL(model ‖ pair) per position on neutral text ("
            + ("StereoSet unrelated sentences of the train targets + " if pairs.kl_unrelated else "")
            + f"{pairs.kl_text_limit} XSum documents in {pairs.kl_chunk_tokens}-token chunks, batch {pairs.kl_batch_size}); val evaluation every {pairs.val_every} steps on "
            f"{trainings[row]['summary']['selection']['val_clusters']} val clusters.")
    lines.append(f"Inference cost: the scoring seconds of the pair over the model alone on the same {cost['n_clusters']} "
                 "test clusters (both models run once per batch); the parameter ratio counts both models' weights, embeddings included.")
    return "  \n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
