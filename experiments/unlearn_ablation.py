"""Which lever lets BiasUnlearn remove bias *and* keep the language model: one row per lever, decided on val.

Every row is a training run on the embedded model at the same step budget: BiasUnlearn's defaults,
then the LMS-aware selection, then that selection plus one more lever per row (and, last, DPO in
BiasUnlearn's place, as the pairwise alternative).  Training uses the train targets; every decision — which
checkpoint a run keeps, and which row is recommended — uses the val targets only (the in-training
evaluations in each run's ``log.jsonl``); the test targets are only reported, with 95 % bootstrap
intervals over target terms (``amendlm.bias.compare``).

Rows (``UnlearnConfig`` options on top of the defaults):

* ``default`` — today's defaults (keep the smallest worst val SS gap);
* ``lms-select`` — keep the smallest worst val gap among evaluations whose val LMS fell ≤ 2 points;
* ``differing`` — + forget/retain losses only on the tokens where stereotype and anti-stereotype differ;
* ``token-mean`` — + NPO on the per-token mean log-ratio of each sequence;
* ``low-lr`` — + lr 5e-5 with 10 warm-up steps;
* ``attention`` — + LoRA on the attention projections only;
* ``big-retain`` — + retain and KL batches of 16 (forget 8);
* ``kl-general`` — + the KL set holds the general text only (not StereoSet's unrelated sentences,
  which anchor off-topic continuations while the forget loss lowers on-topic ones);
* ``dpo-pairwise`` — not a BiasUnlearn lever but its alternative: the forget / retain / KL losses
  replaced by DPO on (anti-stereotype, stereotype) pairs (``--method dpo``, no swapping), lr 3e-4
  with 5 warm-up steps, val evaluations every 10 steps (chosen after a val-only run at lr 6e-4
  overshot to val SS 44 by step 50).
* ``dpo-swap`` — DPO with BiasUnlearn's control (``--method dpo-swap --type-focus all``): every
  bias type whose val SS is outside 50 ± 2 is trained at once, each towards 50 (pairs reversed for
  a type below 50), with 0.1 CE on the chosen side and 0.2 KL on neutral text; decisions every 20
  steps on all 863 val clusters; lr 5e-4, 100 steps (its own budget, twice the others').  Chosen
  from val-only exploration runs (not kept): with 0.3 CE the val LMS rose but val SS barely moved
  (the CE outweighed the pairwise term); focusing the single worst type (gender) did not move its
  val SS while the other types drifted back; swapping a type as soon as it dipped below 50 made
  race, the largest type, oscillate around 50 and the overall val SS with it.
* ``dpo-swap-rest`` — ``dpo-swap`` where a type whose val gap is below 4 rests for the phase
  (``rest_within``) while a type farther from 50 trains.  Chosen from ``dpo-swap``'s own val record:
  the phase's rate follows the *worst* type's gap, so a type near 50 was pushed at the full rate and
  overshot (profession 53.7 at step 40, 44.8 at step 60, 52.6 at step 100).
* ``dpo-long`` — ``dpo-pairwise`` for 150 steps (its own budget).  Chosen from ``dpo-pairwise``'s val
  record: its val SS was still falling at step 50 (53.9) at about 0.3 val LMS points per SS point,
  with no bias type swapped, so the question is where it lands with room to continue.

    python experiments/unlearn_ablation.py                 # --dtype auto, 50 steps per row
    python experiments/unlearn_ablation.py --rows default,differing   # a subset (resumable; the rest later)
    python experiments/unlearn_ablation.py --quick --results-dir /tmp/ab   # two rows, 1 step; ~1.5 min

Cost: a row is one training run (50 steps of 8 + 8 + 8 sequences: ~10 s a step in fp32 on 2 AVX2
cores, ~4 s in bf16 on AVX-512 BF16) plus its val evaluations and one test evaluation (~4-8 min);
about 20 minutes per row on an AVX2 CPU (``dpo-swap``, ``dpo-swap-rest`` and ``dpo-long``, with their own
budgets, 20-40 minutes each).
"""

from __future__ import annotations

import sys

from common import Experiment, markdown_table, resolved_dtype
from targets_common import ss_targets_missed, why_missed
from unlearn_common import (BASE_MODEL, KeptBaseModel, Run, base_eval, describe_test_set, enter_repo, eval_log, eval_step,
                            pareto_figure, read_json, records, target_checks, targets_table, unlearn_config)

STEPS = 50
LMS_SELECT = {"selection": "gap_within_lms", "max_lms_drop": 2.0}
LEVERS: dict[str, dict] = {
    "default": {},
    "lms-select": dict(LMS_SELECT),
    "differing": {**LMS_SELECT, "loss_tokens": "differing"},
    "token-mean": {**LMS_SELECT, "npo_reduction": "token_mean"},
    "low-lr": {**LMS_SELECT, "lr": 5e-5, "warmup_steps": 10},
    "attention": {**LMS_SELECT, "lora_scope": "attention"},
    "big-retain": {**LMS_SELECT, "forget_batch_size": 8, "retain_batch_size": 16, "kl_batch_size": 16},
    "kl-general": {**LMS_SELECT, "kl_unrelated": False},
    "dpo-pairwise": {**LMS_SELECT, "method": "dpo", "lr": 3e-4, "warmup_steps": 5, "eval_every": 10},
    "dpo-swap": {**LMS_SELECT, "method": "dpo-swap", "type_focus": "all", "alpha_forget": 1.0, "alpha_retain": 0.1,
                 "alpha_kl": 0.2, "lr": 5e-4, "warmup_steps": 5, "schedule_scale": 1.0,
                 "phases": [[5.0, 1.0, 100, 20], [3.0, 0.8, 50, 20], [0.0, 0.8, 50, 20]], "val_clusters": None,
                 "max_steps": 100},
}
LEVERS["dpo-swap-rest"] = {**LEVERS["dpo-swap"], "rest_within": 4.0}
LEVERS["dpo-long"] = {**LEVERS["dpo-pairwise"], "max_steps": 150}
QUICK_ROWS = ("default", "differing")


def run_of(row: str, steps: int) -> Run:
    """The run of ``row``; ``default`` is the very run of ``unlearn_methods.py`` (``biasunlearn_s<steps>``), shared."""
    stem = "biasunlearn" if row == "default" else f"ablation_{row}"
    return Run(stem, {"method": "biasunlearn", "max_steps": steps, **LEVERS[row]})


def val_choice(summary: dict, evals: list[dict]) -> dict:
    """The val record of the evaluation a run kept (its step, worst gap, SS, LMS and LMS drop)."""
    step = summary.get("best_step") if str(summary.get("weights_saved", "")).startswith("best") else summary.get("steps")
    record = next((r for r in evals if r["step"] == step), None)
    if record is None:
        return {"step": step}
    base_lms = evals[0]["lms"]["overall"] if evals else None
    return {"step": step, "worst_gap": record["worst_gap"], "ss": record["ss"]["overall"], "lms": record["lms"]["overall"],
            "lms_drop": None if base_lms is None else base_lms - record["lms"]["overall"]}


def lms_cost(points: list[tuple[int, float, float]], min_ss_moved: float = 1.0) -> float | None:
    """Val LMS points lost per val SS point moved towards 50, from step 0 to the last evaluation.

    ``points``: ``(step, overall val SS, overall val LMS)`` in step order.  None when SS moved less
    than ``min_ss_moved`` points towards 50 (the ratio would be noise).  The overall-SS target needs
    about ``|SS_0 − 50| − 2`` points; times this cost is the LMS the lever would lose getting there if
    its trade-off stayed as measured."""
    if len(points) < 2:
        return None
    (_, ss0, lms0), (_, ss1, lms1) = points[0], points[-1]
    moved = abs(ss0 - 50) - abs(ss1 - 50)
    return (lms0 - lms1) / moved if moved >= min_ss_moved else None


def allowed_cost(base_val_ss: float | None) -> str:
    """The LMS cost the targets allow from the step-0 val SS: an LMS drop ≤ 2 for SS within 50 ± 2."""
    if base_val_ss is None:
        return ""
    needed = abs(base_val_ss - 50) - 2
    if needed <= 0:
        return f"The step-0 val SS ({base_val_ss:.1f}) is already within 50 ± 2: any cost meets the targets."
    return (f"The targets ask for SS within 50 ± 2 at an LMS drop ≤ 2: from the step-0 val SS of {base_val_ss:.1f} "
            f"that is a cost ≤ {2 / needed:.2f}.")


def recommend(choices: dict[str, dict], max_lms_drop: float = 2.0) -> str | None:
    """The row decided on val: the smallest worst val gap among kept checkpoints after step 0 whose
    val LMS fell ≤ ``max_lms_drop``; None when no row qualifies."""
    qualified = {row: c for row, c in choices.items()
                 if c.get("step") and c.get("worst_gap") is not None and c.get("lms_drop") is not None
                 and c["lms_drop"] <= max_lms_drop}  # step 0 is the untouched base model: never a recommendation
    return min(qualified, key=lambda row: qualified[row]["worst_gap"]) if qualified else None


def why_chosen_misses(chosen: str | None, evals_of: dict[str, list[dict]], choices: dict[str, dict],
                      selection: dict[str, tuple[str, float]], checks: dict[str, list[dict]], rows: list[dict],
                      base: dict) -> str:
    """For the row recommended on val, when it misses an SS target on test: its val SS per bias type at every
    evaluation (a table) and why the SS targets are missed (:func:`targets_common.why_missed`; only for the
    ``gap_within_lms`` rule it explains).  Empty otherwise."""
    if chosen is None or not evals_of.get(chosen) or not ss_targets_missed({chosen: checks[chosen]}):
        return ""
    evals = evals_of[chosen]
    types = [t for t in evals[0]["ss"] if t != "overall"]
    table = markdown_table(["step", *types, "overall", "val LMS"],
                           [[r["step"], *(r["ss"][t] for t in types), r["ss"]["overall"], r["lms"]["overall"]] for r in evals],
                           "r" * (len(types) + 3))
    out = f"Val SS per bias type of `{chosen}` at each evaluation (kept: step {choices[chosen].get('step')}):\n\n{table}"
    rule, allowance = selection[chosen]
    if rule != "gap_within_lms":
        return out
    lms0 = evals[0]["lms"]["overall"]
    records = [{"lms_drop": lms0 - r["lms"]["overall"], **r} for r in evals]  # as recorded, else from step 0
    test = {r["run"]: r for r in rows}
    groups = base["benchmarks"]["stereoset"]["scores"]["overall"]
    return out + "\n\n" + why_missed({chosen: records}, {chosen: choices[chosen].get("step")}, {chosen: allowance},
                                      {chosen: test[chosen]["ss"]}, (evals[0]["ss"]["overall"], rows[0]["ss"]),
                                      {t: (g["n_targets"], g["n_clusters"]) for t, g in groups.items() if t != "overall"},
                                      kept_what="adapter")


def target_terms() -> str:
    """The number of StereoSet target terms of each bias type in the val split, e.g. ``gender 2,
    profession 6, ...`` (a per-type val SS rests on these few)."""
    from amendlm.data.splits import select_split
    from amendlm.data.stereoset import load_stereoset

    clusters = load_stereoset("stereoset")
    terms: dict[str, set] = {}
    for cluster in select_split(clusters, "val"):
        terms.setdefault(cluster.bias_type, set()).add(cluster.target)
    return ", ".join(f"{name} {len(terms[name])}" for name in sorted(terms))


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, format_cell, markdown_table as compare_table

    def options(parser):
        parser.add_argument("--dtype", default="auto", help="bf16, fp32, or auto (bf16 where native, else fp32).")
        parser.add_argument("--steps", type=int, default=STEPS, help="Training steps of every row (equal compute).")
        parser.add_argument("--rows", default=",".join(LEVERS),
                            help=f"Comma-separated rows to run, in order (default all: {','.join(LEVERS)}).")

    exp, args = Experiment.start("unlearn_ablation", "BiasUnlearn levers: what keeps the language model (decided on val)",
                                 argv, options)
    enter_repo(exp)
    dtype = resolved_dtype(args.dtype)
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in LEVERS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; valid: {', '.join(LEVERS)}")
    rows_run = [r for r in wanted if r in QUICK_ROWS] if exp.quick else wanted
    base_path, base = base_eval(exp, dtype)
    runs, sources, choices, checks, configs, trajectories = [("base (before)", base)], [base_path], {}, {}, {}, {}
    val, kept, val_clusters = {}, {}, {}  # by the row's label in the table: the Pareto figure's val panel
    evals_of, selection = {}, {}  # by row: its val evaluations, its (selection rule, LMS allowance)
    for row in rows_run:
        name, config = unlearn_config(exp, run_of(row, args.steps), dtype)
        path = exp.path(f"unlearn/{name}_test.json")
        label = row
        try:
            data = eval_step(exp, path, BASE_MODEL, dtype, adapter=(name, config))
            sources.append(path)
        except KeptBaseModel:  # no checkpoint after step 0 kept val LMS, and no base evaluation to stand for it
            data = base
        if data is base or data.get("kept_base_model"):
            label = f"{row} (kept step 0 = base)"
        record_dir = records(exp, name)
        summary = read_json(record_dir / "summary.json")
        runs.append((label, data))
        sources.append(record_dir / "summary.json")
        evals = evals_of[row] = eval_log(record_dir)
        choices[row] = val_choice(summary, evals)
        trajectories[row] = [(r["step"], r["ss"]["overall"], r["lms"]["overall"]) for r in evals]
        val[label], kept[label], val_clusters[label] = evals, choices[row].get("step"), config.val_clusters
        checks[row] = target_checks(base, data, base_path.name, path.name)
        configs[row] = {k: v for k, v in config.to_dict().items() if k in LEVERS[row] or k == "max_steps"}
        selection[row] = (config.selection, config.max_lms_drop)

    chosen = recommend(choices)
    costs = {row: lms_cost(points) for row, points in trajectories.items()}
    base_val_ss = next((points[0][1] for points in trajectories.values() if points), None)
    rows = comparison_rows(runs)
    pareto = exp.results / "pareto.png"
    pareto_figure(pareto, {r["run"]: r for r in rows}, val, kept, val_clusters)
    val_rows = [[row, f"`{configs[row]}`", c.get("step"), c.get("worst_gap"), c.get("ss"), c.get("lms"), c.get("lms_drop"),
                 "**yes**" if row == chosen else ""] for row, c in choices.items()]
    markdown = "\n".join([
        "Test targets (reported only; 95 % bootstrap intervals over target terms for SS and LMS, over pairs for CrowS):",
        "",
        compare_table(rows),
        "Val targets (every decision): the evaluation each run kept, and the row recommended — the smallest worst "
        "val SS gap among rows whose kept val LMS fell ≤ 2 points:",
        "",
        markdown_table(["row", "lever", "kept step", "val worst gap", "val SS", "val LMS", "val LMS drop", "recommended"],
                       val_rows, "lllrrrrl"),
        "",
        "Val trajectory of each row (step: overall val SS / LMS at every in-training evaluation; `pareto.png` draws "
        "them, right panel, next to each row's test point):",
        "",
        markdown_table(["row", "val SS / LMS by step", "LMS lost per SS point (step 0 → last)"],
                       [[row, "; ".join(f"{step}: {ss:.1f} / {lms:.1f}" for step, ss, lms in points),
                         "—" if costs[row] is None else f"{costs[row]:.2f}"]
                        for row, points in trajectories.items()], "llr"),
        "",
        "The LMS cost is the val LMS lost per val SS point moved towards 50 between step 0 and the row's last "
        "evaluation (— where SS moved < 1 point towards 50).  " + allowed_cost(base_val_ss),
        "",
        f"BiasUnlearn targets of each row against `{base_path.name}` (test):",
        "",
        targets_table(checks),
        why_chosen_misses(chosen, evals_of, choices, selection, checks, rows, base),
    ])
    met = {row: sum(c["passed"] is True for c in checks[row]) for row in checks}
    own_budget = [f"{row} {configs[row]['max_steps']}" for row in configs if configs[row]["max_steps"] != args.steps]
    notes = (f"Test set: {describe_test_set(base)}; dtype {dtype}; {args.steps} steps per row"
             + (f" (rows with their own budget: {', '.join(own_budget)})" if own_budget else "") + ".  "
             + f"Val target terms per bias type (every per-type val decision rests on these): {target_terms()}.  "
             + "Rows not yet run: "
             + (", ".join(r for r in LEVERS if r not in choices) or "none") + ".  "
             + (f"Recommended on val: `{chosen}` ({met[chosen]} of {len(checks[chosen])} test targets met)."
                if chosen else "No row kept a checkpoint after step 0 whose val LMS fell ≤ 2 points."))
    headline = []
    if chosen:
        row = next(r for r in rows if r["run"] == chosen)
        from amendlm.unlearn.recipes import recipe_fields

        default = " = `amendlm debias`'s default recipe, pairwise" if LEVERS[chosen] == recipe_fields("pairwise") else ""
        headline.append((f"Unlearning, row chosen on val (`{chosen}`{default}; {configs[chosen]['max_steps']} steps, {dtype}), test: SS / LMS "
                          "/ perplexity (95 % CI in brackets)",
                         f"{rows[0]['ss']:.2f} → {format_cell(row, 'ss')} / {rows[0]['lms']:.2f} → {format_cell(row, 'lms')} / "
                         f"{rows[0]['ppl']:.2f} → {row['ppl']:.2f}; {met[chosen]} of {len(checks[chosen])} targets met"))
    summary = {"dtype": dtype, "steps": args.steps, "rows": rows, "val": choices, "val_trajectories": trajectories,
               "val_lms_cost_per_ss_point": costs,
               "recommended": chosen,
               "targets": checks, "levers": configs}
    exp.finish(summary, markdown, notes=notes, pngs=[pareto], sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
