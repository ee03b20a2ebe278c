"""BiasUnlearn and the unlearning baselines on the held-out test targets: the results table, the
BiasUnlearn targets of each run against the base model, training cost, and a Pareto figure.

Rows: the embedded model before unlearning; BiasUnlearn 50 steps; BiasUnlearn with the official
code's batch-mean NPO, 100 steps; the baselines npo, gradascent, graddiff, dpo and sft-anti at the
default recipe's budget (equal compute: 100 steps of 8 examples per stream, val evaluations every 20;
packed steps); the default recipe of ``amendlm debias`` (``pairwise``, 100 steps: the run of
``unlearn_ablation.py``'s ``dpo-swap-rest`` row, shared); the official recipe (``--recipe official``: the
public BiasUnlearn code's settings and control flow, 4 / 28 / 28 examples per step), 300 steps.  Each run is ``amendlm.unlearn.trainer.train`` into
``runs/unlearn/<run>``, evaluated with ``amendlm.bias.evaluate.evaluate_model`` on the test targets
(see ``unlearn_common.py`` for paths and reuse).

    python experiments/unlearn_methods.py --dtype fp32   # the recorded rows (fp32, with per-target records for the CIs): reuses them
    python experiments/unlearn_methods.py                # --dtype auto: bf16 where native, else fp32
    python experiments/unlearn_methods.py --quick --results-dir /tmp/um   # biasunlearn + dpo, 2 steps; ~1 min
    python experiments/unlearn_methods.py --dtype fp32 --rows biasunlearn,npo   # a subset (the page names the rest)

Each row's training and evaluation seconds are in the page's training table (from its summary and eval
JSON).  Estimated before running them: the five baselines at the equal budget about an hour, the official
recipe's 300 packed steps of 4 / 28 / 28 about 45 minutes (2 cores, fp32 with AVX-512).
"""

from __future__ import annotations

import sys

from amendlm.unlearn.recipes import recipe_fields
from common import Experiment, markdown_table, resolved_dtype
from eval_common import seconds_cell, training_seconds
from unlearn_common import (BASE_MODEL, BIASUNLEARN_50, QUICK_UNLEARN, Run, base_eval, describe_test_set, enter_repo,
                            eval_log, eval_step, pairwise_run, pareto_figure, read_json, records, target_checks,
                            targets_table, unlearn_config)

BASELINES = ("npo", "gradascent", "graddiff", "dpo", "sft-anti")
# the default recipe's budget, given to every baseline (equal compute): optimizer steps, examples per stream
# and step (UnlearnConfig's batch_size, 8), val evaluations every 20 steps; packed steps (same losses, faster)
EQUAL_BUDGET = {"max_steps": 100, "eval_every": 20, "packing": True}
OFFICIAL_STEPS = 300  # the official recipe runs until every type is within 2 of 50 or step 1000; here up to 300
RUNS = (
    BIASUNLEARN_50,
    # `--npo-reduction batch_mean --max-steps 100` (README; the run's name records its lr, the default)
    Run("bu_bm_lr2e-4", {"method": "biasunlearn", "npo_reduction": "batch_mean", "max_steps": 100}),
    # `amendlm debias --method M --out runs/unlearn/M_s100_fp32 --dtype fp32 --max-steps 100 --eval-every 20 --packing`
    *(Run(m, {"method": m, **EQUAL_BUDGET}) for m in BASELINES),
    pairwise_run(),  # `amendlm debias --out runs/unlearn/ablation_dpo-swap-rest_s100_fp32 --dtype fp32`
    # `amendlm debias --recipe official --max-steps 300 --packing --out runs/unlearn/official_s300_fp32 --dtype fp32`
    Run("official", {"recipe": "official", **recipe_fields("official"), "max_steps": OFFICIAL_STEPS, "packing": True}),
)
ROW_NAMES = tuple(run.stem for run in RUNS)  # --rows names a run by its stem
QUICK_RUNS = (BIASUNLEARN_50, Run("dpo", {"method": "dpo", "max_steps": 50, "eval_every": 25}))
# settings shown once for all rows when they are equal
SHARED = ("model", "batch_size", "lr", "lora_r", "lora_alpha", "lora_dropout", "seed", "split_seed", "val_clusters",
          "keep_best", "dtype")
_NOT_OPTIONS = ("out", "model", "dtype")  # named elsewhere in the table


def options_text(config) -> str:
    """The options of a run that differ from UnlearnConfig's defaults, e.g. ``method=dpo max_steps=50 eval_every=25``."""
    from amendlm.unlearn.config import UnlearnConfig

    default = UnlearnConfig(out=config.out).to_dict()
    return " ".join(f"{k}={v}" for k, v in config.to_dict().items() if k not in _NOT_OPTIONS and v != default[k])


def label_of(config) -> str:
    """``method, <options besides the budget>, N steps``, e.g. ``biasunlearn, npo_reduction=batch_mean, 100 steps``.

    The ``--quick`` budget is left out (it is the same for every row and in the options column)."""
    for recipe, label in (("pairwise", "default recipe (pairwise)"), ("official", "official recipe")):
        if all(getattr(config, k) == v for k, v in recipe_fields(recipe).items() if k != "max_steps"):
            return f"{label}, {config.max_steps} steps"
    budget = ("method", "max_steps", "eval_every", "packing", *QUICK_UNLEARN)  # in the training table's options column
    extra = [o for o in options_text(config).split() if o.split("=", 1)[0] not in budget]
    return ", ".join([config.method, *extra, f"{config.max_steps} steps"])


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, markdown_table as compare_table
    from amendlm.unlearn.artifacts import read_log

    def options(parser):
        parser.add_argument("--dtype", default="auto",
                            help="bf16 (the recorded rows), fp32, or auto (bf16 where this machine does it natively, else fp32).")
        parser.add_argument("--rows", default=",".join(ROW_NAMES),
                            help=f"Comma-separated runs to compute and show, in the table's order (default all: "
                                 f"{','.join(ROW_NAMES)}); the page names the runs left out.")

    exp, args = Experiment.start("unlearn_methods", "BiasUnlearn and the unlearning baselines (held-out test targets)",
                                 argv, options)
    enter_repo(exp)
    dtype = resolved_dtype(args.dtype)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROW_NAMES]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; valid: {', '.join(ROW_NAMES)}")
    left_out = [r for r in ROW_NAMES if r not in wanted]
    base_path, base = base_eval(exp, dtype)
    base_label = "base (before)"
    runs, sources = [(base_label, base)], [base_path]
    checks, training, val, kept, val_clusters, configs = {}, {}, {}, {}, {}, {}
    for run in QUICK_RUNS if exp.quick else [r for r in RUNS if r.stem in wanted]:
        name, config = unlearn_config(exp, run, dtype)
        path = exp.path(f"unlearn/{name}_test.json")
        data = eval_step(exp, path, BASE_MODEL, dtype, adapter=(name, config))
        label = label_of(config)
        record_dir = records(exp, name)
        summary = read_json(record_dir / "summary.json")
        runs.append((label, data))
        sources += [path, record_dir / "summary.json"]
        checks[label] = target_checks(base, data, base_path.name, path.name)
        val[label] = eval_log(record_dir)
        kept[label] = summary.get("best_step") if summary.get("weights_saved", "").startswith("best") else summary.get("steps")
        val_clusters[label] = summary.get("val_clusters")
        configs[label] = config.to_dict()
        log = read_log(record_dir / "log.jsonl")
        train_seconds, lower_bound = training_seconds(summary, log, per_step=True)
        training[label] = {"run": config.out, "options": options_text(config), "status": summary.get("status"),
                           "steps": summary.get("steps"), "weights_saved": summary.get("weights_saved"),
                           "train_seconds": train_seconds, "train_seconds_lower_bound": lower_bound,
                           "eval_seconds": data.get("seconds_total")}

    rows = comparison_rows(runs)
    pareto = exp.results / "pareto.png"
    pareto_figure(pareto, {r["run"]: r for r in rows}, val, kept, val_clusters)

    train_rows = [[label, f"`{t['options']}`", t["status"], t["steps"], t["weights_saved"],
                   seconds_cell(t["train_seconds"], t["train_seconds_lower_bound"]),
                   round(t["eval_seconds"]) if t["eval_seconds"] is not None else None] for label, t in training.items()]
    markdown = "\n".join([
        compare_table(rows),
        f"BiasUnlearn targets of each run against `{base_path.name}` (`amendlm.bias.compare.check_targets`; the "
        "value in brackets is what the target bounds: |SS − 50|, the largest per-type |SS − 50|, the LMS drop in points, "
        "the perplexity increase in %, |CrowS − 50|, the lowest per-type SS):",
        "",
        targets_table(checks),
        "Training (options besides the defaults of `UnlearnConfig`; seconds of the training and of the evaluation, "
        "each as recorded in its run's `summary.json` and its eval JSON; ≥: a resumed run whose earlier parts' "
        "seconds were not all recorded):",
        "",
        markdown_table(["run", "options", "status", "steps", "weights", "training s", "eval s"], train_rows, "lllrlrr"),
    ])
    shared = {}
    for key in SHARED:
        values = {repr(c[key]) for c in configs.values()}
        shared[key] = next(iter(configs.values()))[key] if len(values) == 1 else "varies"
    met = {label: sum(c["passed"] is True for c in row) for label, row in checks.items()}
    notes = "\n".join([
        f"Test set: {describe_test_set(base)}; every row evaluated in {base['config']['dtype']}, "
        f"examples per benchmark: {base['config']['limit'] or 'all'}.  "
        "SS, LMS and ICAT pool intra- and intersentence (ideal SS 50, LMS 100).",
        "",
        "Settings of every run: " + ", ".join(f"{k} {v}" for k, v in shared.items()) + ".",
        "",
        "Targets met (of " + str(len(next(iter(checks.values()), []))) + "): "
        + "; ".join(f"{label}: {n}" for label, n in met.items()) + "."
        + (f"  Runs not shown (left out by `--rows`, not yet run here): {', '.join(left_out)}." if left_out and not exp.quick
           else ""),
        "",
        "`pareto.png`: left and middle, one point per run on the **test** targets (square: the base model; grey band: "
        "the overall-SS target); right, the **val** trajectory of each run (its in-training evaluations on the val "
        "targets, from `log.jsonl`), a different split and cluster sample, so its axes are not comparable with the "
        "test panels.",
    ])
    summary = {"dtype": dtype, "eval": base.get("step_config") or base.get("config"), "rows": rows, "left_out": left_out,
               "targets": checks,
               "training": training, "val": {label: [{"step": r["step"], "ss": r["ss"]["overall"], "lms": r["lms"]["overall"]}
                                                     for r in recs] for label, recs in val.items()},
               "configs": configs}
    headline = []
    if len(rows) > 1:  # the first method (BiasUnlearn, 50 steps) against the base model
        before, after = rows[0], rows[1]
        headline.append((f"{after['run']} vs base, held-out test targets ({dtype}): SS / LMS / CrowS / perplexity",
                         " / ".join(f"{before[k]:.2f} → {after[k]:.2f}" for k in ("ss", "lms", "crows", "ppl"))
                         + f"; {met[after['run']]} of {len(checks[after['run']])} targets met"))
    exp.finish(summary, markdown, notes=notes, pngs=[pareto], sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
