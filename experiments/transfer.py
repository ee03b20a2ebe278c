"""Transfer: does the BiasUnlearn adapter of the embedded model carry over to a variant of it?

The variant is the embedded model with every weight fine-tuned briefly on general text
(``amendlm.finetune.finetune_variant``: 60 steps x 8 chunks of 128 XSum tokens, into ``runs/variant``).
Rows, each on the held-out test targets: the variant alone; the variant + the 50-step BiasUnlearn
adapter trained on the embedded model (``runs/unlearn/biasunlearn_s50``, shared with
``unlearn_methods.py``), unchanged; the variant + an adapter trained on the variant with the same
configuration (``runs/unlearn/variant_biasunlearn_s50``).  The notes compare the SS change with the
one the adapter makes on the model it was trained on.

    python experiments/transfer.py --dtype bf16   # the recorded rows (made on an AVX-512 BF16 CPU): reuses them
    python experiments/transfer.py                # --dtype auto: bf16 where native, else fp32
    python experiments/transfer.py --quick --results-dir /tmp/tr   # 2-step variant and adapters; ~1.5 min

From scratch the full run takes about 45 minutes on the machine that made the recorded rows
(fine-tuning 450 s, the two adapters 525 + 490 s, five evaluations 1,130 s, as recorded in their
JSONs; bf16 on an AVX-512 BF16 CPU), less when ``unlearn_methods.py`` made the first adapter already;
fp32 on an AVX2-only CPU several times that.
"""

from __future__ import annotations

import sys

from common import Experiment, markdown_table, resolved_dtype
from unlearn_common import (BASE_MODEL, BIASUNLEARN_50, Run, base_eval, describe_test_set, dtype_tag, enter_repo,
                            eval_step, read_json, records, target_checks, targets_table, unlearn_config,
                            variant_config, variant_record)


def main(argv: list[str] | None = None) -> dict:
    from amendlm.bias.compare import comparison_rows, markdown_table as compare_table

    def options(parser):
        parser.add_argument("--dtype", default="auto",
                            help="bf16 (the recorded rows), fp32, or auto (bf16 where this machine does it natively, else fp32).")

    exp, args = Experiment.start("transfer", "Transfer: the BiasUnlearn adapter on a fine-tuned variant", argv, options)
    enter_repo(exp)
    dtype = resolved_dtype(args.dtype)
    tag = dtype_tag(dtype)
    variant = variant_config(exp, dtype)
    transferred = unlearn_config(exp, BIASUNLEARN_50, dtype)  # trained on the embedded model
    own = unlearn_config(exp, Run("variant_biasunlearn", BIASUNLEARN_50.options), dtype, model=variant.out)

    paths = {key: exp.path(f"unlearn/variant{tag}{suffix}_test.json")
             for key, suffix in (("alone", ""), ("transferred", "_transferred"), ("own", "_own"))}
    alone = eval_step(exp, paths["alone"], variant.out, dtype, variant=variant)
    with_transferred = eval_step(exp, paths["transferred"], variant.out, dtype, adapter=transferred, variant=variant)
    with_own = eval_step(exp, paths["own"], variant.out, dtype, adapter=own, variant=variant)
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
        f"BiasUnlearn targets of each adapter on the variant against `{paths['alone'].name}` "
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
        f"row is `{original_path.name}` against `{base_path.name}` (the `unlearn_methods` rows).",
    ])
    summary = {"dtype": dtype, "rows": rows, "targets": checks, "ss_change": change,
               "original_rows": original_rows, "variant": {k: record.get(k) for k in
                                                            ("steps", "sequences_per_step", "tokens_per_step", "texts",
                                                             "mean_loss", "final_loss", "seconds", "dtype")},
               "configs": {"variant": variant.to_dict(), "transferred": transferred[1].to_dict(), "own": own[1].to_dict()}}
    sources = [*paths.values(), variant_record(exp, variant), records(exp, own[0]) / "summary.json",
               base_path, original_path]
    headline = [(f"Transfer: SS change of a BiasUnlearn adapter on a fine-tuned variant / on the model it was trained on ({dtype})",
                 " / ".join("n/a" if change[k] is None else f"{change[k]:+.2f}"
                            for k in ("variant, transferred adapter", "embedded model, the same adapter")))]
    exp.finish(summary, markdown, notes=notes, sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
