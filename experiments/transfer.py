"""Transfer: does the debiasing adapter of the embedded model carry over to a variant of it?

The adapter is the default recipe's (``amendlm debias``: ``pairwise``, 100 steps, the kept step chosen
on val), trained on the embedded model: the run of ``unlearn_ablation.py``'s ``dpo-swap-rest`` row
(``runs/unlearn/ablation_dpo-swap-rest_s100_fp32``), shared with it.  The variant is the embedded model
with every weight fine-tuned briefly on general text (``amendlm.finetune.finetune_variant``: 60 steps x
8 chunks of 128 XSum tokens, into ``runs/variant_fp32``).  Rows, each on the held-out test targets:
the variant alone; the variant + that adapter, unchanged; the variant + an adapter trained on the
variant with the same configuration (``runs/unlearn/variant_pairwise_s100_fp32``).  The notes compare
the SS change with the one the adapter makes on the model it was trained on.

    python experiments/transfer.py --dtype fp32   # the recorded rows: reuses them
    python experiments/transfer.py                # --dtype auto: bf16 where native, else fp32
    python experiments/transfer.py --quick --results-dir /tmp/tr   # 1-step variant and adapters; ~1.5 min

From scratch (nothing reused) the full run takes about an hour on 2 cores in fp32: fine-tuning the
variant, two 100-step trainings with six val evaluations each, five test evaluations (each step's
seconds are recorded in its JSON).
"""

from __future__ import annotations

import sys

from common import Experiment, markdown_table, resolved_dtype
from unlearn_common import (BASE_MODEL, KeptBaseModel, Run, base_eval, describe_test_set, dtype_tag, enter_repo,
                            eval_step, read_json, records, target_checks, targets_table, unlearn_config,
                            pairwise_run, variant_config, variant_record)


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, markdown_table as compare_table

    def options(parser):
        parser.add_argument("--dtype", default="auto",
                            help="fp32 (the recorded rows), bf16, or auto (bf16 where this machine does it natively, else fp32).")

    exp, args = Experiment.start("transfer", "Transfer: the debiasing adapter (default recipe) on a fine-tuned variant", argv, options)
    enter_repo(exp)
    dtype = resolved_dtype(args.dtype)
    tag = dtype_tag(dtype)
    variant = variant_config(exp, dtype)
    run = pairwise_run()
    transferred = unlearn_config(exp, run, dtype)  # trained on the embedded model
    own = unlearn_config(exp, Run("variant_pairwise", run.options), dtype, model=variant.out)

    paths = {key: exp.path(f"unlearn/variant{tag}{suffix}_test.json")
             for key, suffix in (("alone", ""), ("transferred", "_transferred"), ("own", "_own"))}
    alone = eval_step(exp, paths["alone"], variant.out, dtype, variant=variant)
    with_transferred = eval_step(exp, paths["transferred"], variant.out, dtype, adapter=transferred, variant=variant)
    try:
        with_own = eval_step(exp, paths["own"], variant.out, dtype, adapter=own, variant=variant)
    except KeptBaseModel:  # its val selection kept step 0: the variant itself
        with_own = alone
    # the same adapter on the model it was trained on (rows of unlearn_methods.py, reused from there)
    base_path, base = base_eval(exp, dtype)
    original_path = exp.path(f"unlearn/{transferred[0]}_test.json")
    original = eval_step(exp, original_path, BASE_MODEL, dtype, adapter=transferred)

    labels = {"alone": "variant alone", "transferred": "variant + transferred adapter", "own": "variant + its own adapter"}
    rows = comparison_rows([(labels["alone"], alone), (labels["transferred"], with_transferred), (labels["own"], with_own)])
    checks = {labels[key]: target_checks(alone, data, paths["alone"].name, paths[key].name)
              for key, data in (("transferred", with_transferred), ("own", with_own))}
    original_rows = comparison_rows([("base", base), ("base + adapter", original)])

    def ss_change(before: dict, after: dict) -> float | None:
        return None if before["ss"] is None or after["ss"] is None else after["ss"] - before["ss"]

    change = {"variant, transferred adapter": ss_change(rows[0], rows[1]),
              "variant, its own adapter": ss_change(rows[0], rows[2]),
              "embedded model, the same adapter": ss_change(*original_rows)}
    record = read_json(variant_record(exp, variant))
    own_summary = read_json(records(exp, own[0]) / "summary.json")
    transferred_summary = read_json(records(exp, transferred[0]) / "summary.json")

    chunk = record["tokens_per_step"] // record["sequences_per_step"]
    last = (record.get("log") or [{}])[-1]
    markdown = "\n".join([
        compare_table(rows),
        f"The BiasUnlearn targets of each adapter on the variant against `{paths['alone'].name}` "
        "(`amendlm.bias.compare.check_targets`; in brackets the quantity each target bounds):",
        "",
        targets_table(checks),
        markdown_table(["SS change (after − before)", "points"], [[k, v] for k, v in change.items()]),
    ])
    notes = "\n".join([
        f"The variant: `{variant.model}` with every weight fine-tuned for {record['steps']} steps x "
        f"{record['sequences_per_step']} chunks of {chunk} tokens of {record['texts']} `{variant.texts}` texts "
        f"(`FinetuneConfig(max_steps={variant.max_steps}, lr={variant.lr:g}, dtype='{record['dtype']}')`; "
        f"mean train loss {record['mean_loss']:.2f}, {last.get('loss', float('nan')):.2f} over the last logging window; "
        f"{record['seconds']:.0f} s; from `{variant_record(exp, variant).name}`).  Both adapters: "
        f"`{transferred[1].method}`, {transferred[1].max_steps} steps, the same `UnlearnConfig` but for the model; "
        f"kept weights: transferred {transferred_summary.get('weights_saved')}, own {own_summary.get('weights_saved')}.",
        "",
        f"Test set: {describe_test_set(alone)}; dtype {alone['config']['dtype']}.  The last table's embedded-model "
        f"row is `{original_path.name}` against `{base_path.name}` (the `unlearn_ablation` rows).",
    ])
    summary = {"dtype": dtype, "rows": rows, "targets": checks, "ss_change": change,
               "original_rows": original_rows, "variant": {k: record.get(k) for k in
                                                            ("steps", "sequences_per_step", "tokens_per_step", "texts",
                                                             "mean_loss", "final_loss", "seconds", "dtype")},
               "configs": {"variant": variant.to_dict(), "transferred": transferred[1].to_dict(), "own": own[1].to_dict()}}
    sources = [*paths.values(), variant_record(exp, variant), records(exp, own[0]) / "summary.json",
               base_path, original_path]
    def with_interval(value: float | None, row: dict) -> str:  # the paired bootstrap of the row against its first
        test = (row.get("vs_first") or {}).get("ss")
        text = "n/a" if value is None else f"{value:+.2f}"
        return f"{text} [{test['low']:+.1f}, {test['high']:+.1f}]" if test and value is not None else text

    headline = [(f"Transfer: SS change [95 % CI] of the default recipe's adapter on a fine-tuned variant / on the model "
                 f"it was trained on ({dtype})",
                 with_interval(change["variant, transferred adapter"], rows[1]) + " / "
                 + with_interval(change["embedded model, the same adapter"], original_rows[1]))]
    exp.finish(summary, markdown, notes=notes, sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
