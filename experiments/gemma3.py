"""The second embedded architecture, Gemma 3 270M: its full evaluation and an unlearning before/after.

``gemma3-270m`` is the base Gemma 3 270M, reassembled from its GGUF part packages and converted
once to safetensors (``amendlm.gguf_files``): 262k-token vocabulary, tied embeddings, sliding-window
attention, a tokenizer that adds BOS itself — a different architecture from the SmolLM2 (Llama)
model every other table uses.  Two tables:

1. the whole StereoSet dev set (per task and bias type), CrowS-Pairs (per bias type) and WikiText
   perplexity, as ``eval_embedded.py`` makes them for the SmolLM2 model;
2. unlearning with the default recipe, ``pairwise`` (``amendlm debias --model gemma3-270m``: DPO pairs
   under BiasUnlearn's val-driven control, 100 steps; train targets train, val targets decide the
   kept checkpoint), evaluated before and after on the held-out **test** targets with 95 %
   bootstrap intervals, and the BiasUnlearn targets (``amendlm.bias.compare.check_targets``).

    python experiments/gemma3.py                    # fp32 (exact); about 1.5 CPU-hours on 2 cores
    python experiments/gemma3.py --quick --results-dir /tmp/g3   # 6 examples, 1 training step; ~1 min

Resumable: each evaluation and the training run are steps reused when their configuration matches.
"""

from __future__ import annotations

import sys

from common import Experiment, markdown_table, run_eval
from eval_common import seconds_cell, training_seconds
from eval_embedded import full_eval_markdown
from unlearn_common import (KeptBaseModel, Run, describe_test_set, enter_repo, eval_log,
                            eval_options, eval_step, read_json, records, target_checks, targets_table,
                            unlearn_config)

MODEL = "gemma3-270m"
RECIPE = "pairwise"  # the CLI's default recipe


def recipe_run() -> Run:
    """The run ``amendlm debias --model gemma3-270m`` makes: the default recipe's fields, recorded under its name."""
    from amendlm.unlearn.recipes import recipe_fields

    return Run(f"{MODEL}_{RECIPE}", {**recipe_fields(RECIPE), "recipe": RECIPE})


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, format_cell, markdown_table as compare_table
    from amendlm.unlearn.artifacts import read_log

    def options(parser):
        parser.add_argument("--dtype", default="fp32", help="fp32 (exact, default), bf16 or auto.")

    exp, args = Experiment.start("gemma3", f"A second architecture: `{MODEL}` evaluated and debiased", argv, options)
    enter_repo(exp)
    dtype = args.dtype

    # 1. the whole dev set, every benchmark
    full_path = exp.path(f"gemma3/{MODEL}_all_{dtype}.json")
    full = run_eval(exp, full_path, MODEL, split="all", limit=6 if exp.quick else None, dtype=dtype)

    # 2. unlearning with the default recipe, before / after on the test targets
    base_path = exp.path(f"gemma3/{MODEL}_base_test_{dtype}.json")
    base = run_eval(exp, base_path, MODEL, **eval_options(exp, dtype))
    name, config = unlearn_config(exp, recipe_run(), dtype, model=MODEL)
    after_path = exp.path(f"gemma3/{name}_test.json")
    try:
        after = eval_step(exp, after_path, MODEL, dtype, adapter=(name, config))
        kept_base = False
    except KeptBaseModel:  # the selection kept step 0: the "after" row is the base model itself
        after, kept_base = base, True
    record_dir = records(exp, name)
    summary_run = read_json(record_dir / "summary.json")
    val = [{"step": r["step"], "ss": r["ss"]["overall"], "lms": r["lms"]["overall"]} for r in eval_log(record_dir)]

    label = f"recipe {RECIPE}, {config.max_steps} steps (kept {summary_run.get('weights_saved')})"
    rows = comparison_rows([("base (before)", base), (label, after)])
    checks = {label: target_checks(base, after, base_path.name, after_path.name)}
    met = sum(c["passed"] is True for c in checks[label])
    val_md = markdown_table(["step", "val SS", "val LMS"], [[r["step"], r["ss"], r["lms"]] for r in val]) if val else ""
    markdown = "\n".join([
        f"**Whole StereoSet dev set, CrowS-Pairs and perplexity** (`{MODEL}`, {full['config']['dtype']}):",
        "",
        full_eval_markdown(full),
        "",
        f"**Unlearning (`--recipe {RECIPE}`) on `{MODEL}`, held-out test targets** (95 % bootstrap intervals):",
        "",
        compare_table(rows),
        f"BiasUnlearn targets against `{base_path.name}` (in brackets the quantity each target bounds):",
        "",
        targets_table(checks),
        "In-training evaluations on the **val** targets (they chose the kept checkpoint):",
        "",
        val_md,
    ])
    seconds = {k: round(v["seconds"]) for k, v in full["benchmarks"].items() if "seconds" in v}
    train_seconds = training_seconds(summary_run, read_log(record_dir / "log.jsonl"), per_step=True)  # ≥: part of a resumed run
    notes = "\n".join([
        f"Model `{MODEL}`: the base Gemma 3 270M from `gemma-3-270m-q4_k_m.gguf` (dequantised once to safetensors "
        f"by `amendlm.gguf_files`), start token `{(full.get('start_token') or {}).get('token', 'BOS (not recorded)')}`.  "
        "Seconds per benchmark of the whole-dev-set evaluation: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + ".",
        "",
        f"Run `{config.out}` (recipe `{RECIPE}`): method `{config.method}`, {config.max_steps} steps, lr {config.lr:g}, "
        f"dtype {config.dtype}, status {summary_run.get('status')}, {summary_run.get('steps')} steps, kept weights "
        f"{summary_run.get('weights_saved')}, training {seconds_cell(*train_seconds) or 'n/a'} s"
        + ("; the selection kept step 0, so the after row is the base model" if kept_base else "") + ".  "
        f"Test set: {describe_test_set(base)}.  Targets met: {met} of {len(checks[label])}.",
    ])
    summary = {"dtype": dtype, "model": MODEL, "full": {"stereoset": full["benchmarks"]["stereoset"]["scores"]["overall"],
                                                       "crows_pairs": full["benchmarks"]["crows-pairs"]["scores"]["overall"],
                                                       "perplexity": full["benchmarks"]["perplexity"]["perplexity"]},
               "rows": rows, "targets": checks, "val": val, "kept_base_model": kept_base, "config": config.to_dict(),
               "train_seconds": train_seconds[0], "train_seconds_lower_bound": train_seconds[1]}
    o = full["benchmarks"]["stereoset"]["scores"]["overall"]["overall"]
    before, after_row = rows
    headline = [
        (f"`{MODEL}`, whole StereoSet dev set: SS / LMS / ICAT; CrowS-Pairs; WikiText perplexity ({dtype})",
         f"{o['ss']:.2f} / {o['lms']:.2f} / {o['icat']:.2f}; "
         f"{full['benchmarks']['crows-pairs']['scores']['overall']['metric']:.2f}; "
         f"{full['benchmarks']['perplexity']['perplexity']:.2f}"),
        (f"`{MODEL}` + unlearning (recipe {RECIPE}, {config.max_steps} steps) vs base, held-out test targets ({dtype}): SS / LMS / CrowS / perplexity (95 % CI in brackets)",
         " / ".join(f"{before[k]:.2f} → {format_cell(after_row, k)}" for k in ("ss", "lms", "crows"))
         + f" / {before['ppl']:.2f} → {after_row['ppl']:.2f}"
         + f"; {met} of {len(checks[label])} targets met"),
    ]
    sources = [full_path, base_path, *([] if kept_base else [after_path]), record_dir / "summary.json"]
    exp.finish(summary, markdown, notes=notes, sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
