"""BiasUnlearn training-step cost: batch shape, packed vs padded rows, reference model and dtype.

Runs ``benchmarks/bench_unlearn.py`` (its :func:`measure`; each configuration in a fresh process,
so that peak memory is its own) and renders two tables: the default 8 / 8 / 8 and the official
4 / 28 / 28 step, padded and packed (s / step and the fraction of the fp32 matmul peak measured
in the same run, from nominal and from executed FLOPs: see the benchmark's docstring); and the
reference model (disabled adapter vs a second copy) and dtype.

    python experiments/bench_unlearn.py            # 3 timed steps, batch 8 per stream (default recipe), as published
                                                   # (~10 min on a quiet 2-core CPU: 7 configurations of 4 steps + model loads)
    python experiments/bench_unlearn.py --quick --results-dir /tmp/r   # 1 step, batch 1, default recipe padded / packed

A measurement already in ``results/bench_unlearn.json`` (the benchmark's CLI) or
``results/bench_unlearn/bench_unlearn.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import sys

from bench_common import fmt, load_benchmark, measured, measurement_notes
from common import Experiment, markdown_table

REFERENCES = {"adapter": "base under the disabled adapter", "copy": "second frozen copy"}
DTYPES = {"fp32": "fp32", "bf16": "bf16 autocast"}
MEMORY = {"process_peak_rss": "peak RSS", "cuda_max_allocated": "peak CUDA memory"}
RECIPES = {"default": "default recipe", "official": "official recipe"}
QUICK_CONFIGS = ["default/padded/adapter/fp32", "default/packed/adapter/fp32"]


def legacy_options(data: dict) -> dict:
    """The options a file written before ``options`` were recorded states of itself; the model was not
    recorded and was the command-line default then (the embedded model)."""
    return {"model": "smollm2-135m-instruct", **{k: data[k] for k in ("steps", "batch_size") if k in data}}


def _row(row: dict) -> dict:
    """A row with the fields of files written before packing existed (the default recipe, padded)."""
    return {"recipe": "default", "packing": False, **row}


def _peak(row: dict) -> str:
    return f"{row['gflops_per_s']:.1f} ({100 * row['fraction_of_matmul_peak']:.0f} % of peak)"


def _executed(row: dict) -> str:
    """Executed GFLOP/s and fraction of peak; n/a for a measurement from before they were counted."""
    if "executed_gflops_per_s" not in row:
        return "n/a"
    return f"{row['executed_gflops_per_s']:.1f} ({100 * row['executed_fraction_of_matmul_peak']:.0f} % of peak)"


def shape_table(rows: list[dict], memory: str) -> str:
    """Default and official step, padded and packed: one line per measured configuration."""
    lines = []
    for row in rows:
        if row["reference"] != "adapter" or "seconds_per_step" not in row:
            continue
        shape = " / ".join(str(v) for v in row["batch_sizes"].values()) if "batch_sizes" in row else ""
        real = row.get("policy_tokens_per_step")
        run = row.get("packed_tokens_per_step" if row["packing"] else "padded_tokens_per_step")
        lines.append([f"{RECIPES.get(row['recipe'], row['recipe'])} ({shape})", "packed" if row["packing"] else "padded",
                      DTYPES.get(row["dtype"], row["dtype"]), f"{row['seconds_per_step']:.2f}",
                      fmt(row.get("cpu_seconds_per_step"), 2),
                      f"{row['speedup_vs_padded']:.2f}x" if "speedup_vs_padded" in row else "",
                      _peak(row), _executed(row), f"{run / real:.2f}" if real and run else "n/a",
                      fmt(row["peak_memory_mib"], 0, " MiB")])
    return markdown_table(["step (forget / retain / KL)", "rows", "dtype", "s / step", "CPU s / step", "speed-up vs padded",
                           "GFLOP/s (nominal)", "GFLOP/s (executed)", "model tokens per real token", memory], lines,
                          "lllrrrrrrr")


def reference_table(rows: list[dict], memory: str) -> str:
    """The default recipe's padded step: reference model and dtype (the table from before packing)."""
    lines = []
    for row in rows:
        if row["recipe"] != "default" or row["packing"]:
            continue
        default = row["reference"] == "adapter" and row["dtype"] == "fp32"
        label = REFERENCES.get(row["reference"], row["reference"]) + (" (default)" if default else "")
        dtype = DTYPES.get(row["dtype"], row["dtype"])
        if "skipped" in row:
            lines.append([label, dtype, f"skipped: {row['skipped']}", "", "", "", "", ""])
            continue
        time_ratio = row.get("time_vs_baseline", row.get("time_vs_adapter_fp32"))
        memory_ratio = row.get("memory_vs_baseline", row.get("memory_vs_adapter_fp32"))
        lines.append([label, dtype, f"{row['seconds_per_step']:.2f}", f"{time_ratio:.2f}",
                      fmt(row["peak_memory_mib"], 0, " MiB"), f"{memory_ratio:.2f}", _peak(row), _executed(row)])
    return markdown_table(["reference model", "dtype", "s / step", "time vs adapter fp32", memory,
                           "memory vs adapter fp32", "GFLOP/s (nominal)", "GFLOP/s (executed)"], lines, "llrrrrrr")


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--model", default="smollm2-135m-instruct", help="Model to unlearn on.")
        parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps (after one warm-up step).")
        parser.add_argument("--batch-size", type=int, default=8, help="Examples per stream per step (default recipe).")

    exp, args = Experiment.start("bench_unlearn", "BiasUnlearn training-step cost: batch shape, packing, reference model and dtype",
                                 argv, options)
    bench = load_benchmark("bench_unlearn")
    configs = QUICK_CONFIGS if args.quick else [bench.config_label(*c) for c in bench.CONFIGS]
    opts = {"model": args.model, "steps": 1 if args.quick else args.steps, "batch_size": 1 if args.quick else args.batch_size,
            "configs": configs}
    data, path, unrecorded = measured(exp, "bench_unlearn", opts,
                                      lambda: bench.measure(opts["model"], opts["steps"], opts["batch_size"], configs),
                                      legacy_options)
    rows = [_row(r) for r in data["rows"]]
    measured_rows = [r for r in rows if "seconds_per_step" in r]
    memory = " / ".join(MEMORY.get(k, k) for k in sorted({r["memory_kind"] for r in measured_rows})) or "peak memory"
    markdown = shape_table(rows, memory) + "\n\n" + reference_table(rows, memory)
    notes = (measurement_notes(data, path, exp, unrecorded, data.get("torch_threads", "not recorded"))
             + f"  Median of {data['steps']} optimizer steps after a warm-up step, each configuration in a fresh process "
             "(s / step: wall clock; CPU s / step: the process's CPU time, all threads); "
             f"the default recipe runs {data['batch_size']} examples per stream, the official recipe 4 / 28 / 28 "
             "(and attention-only LoRA, no general text in the KL set).  Packed: each step's sequences in rows of at most "
             "256 tokens with block-diagonal attention masks, one policy and one reference pass a step, NPO's reference "
             "log-probs cached per example (amendlm.unlearn.forward).  Nominal FLOPs are the same for padded and packed "
             "rows: 6 x parameters per policy token (forward + backward) and 2 x parameters per reference token of the "
             "examples drawn, padding excluded; so a packed row's fraction of peak is its speed-up times the padded row's.  "
             "Executed FLOPs estimate the matmul work the passes ran (benchmarks/bench_unlearn.py): per policy position "
             "4 x the frozen base's matmul parameters (embedding lookups aside; forward + activation gradients, no weight "
             "gradients) plus 6 x the LoRA parameters, per reference position 2 x the base's, positions counted as they ran (padding included; the "
             "LM head on the scored positions only when packed; cached reference log-probs cost nothing); n/a for a "
             "measurement from before they were counted.  "
             "Model tokens per real token: the tokens the forward passes run (padding included) per example token.")
    summary = {"options": opts, "unrecorded_options": unrecorded, "matmul_gflops": data["matmul_gflops"], "rows": data["rows"]}
    headline = []
    by_label = {f"{r['recipe']}/{'packed' if r['packing'] else 'padded'}/{r['reference']}/{r['dtype']}": r for r in measured_rows}
    padded, packed = by_label.get("official/padded/adapter/fp32"), by_label.get("official/packed/adapter/fp32")
    if padded and packed:
        headline.append(("Official BiasUnlearn step (4 / 28 / 28, fp32), padded -> packed rows: s / step (fraction of the "
                         "fp32 matmul peak)", f"{padded['seconds_per_step']:.1f} s ({100 * padded['fraction_of_matmul_peak']:.0f} %)"
                         f" -> {packed['seconds_per_step']:.1f} s ({100 * packed['fraction_of_matmul_peak']:.0f} %)"))
    copy, base = by_label.get("default/padded/copy/fp32"), by_label.get("default/padded/adapter/fp32")
    if copy and base:
        headline.append(("BiasUnlearn step, disabled-adapter reference vs a second frozen copy (fp32): time / memory",
                         f"{base['seconds_per_step'] / copy['seconds_per_step']:.2f}x / "
                         f"{base['peak_memory_mib'] / copy['peak_memory_mib']:.2f}x of the copy's"))
    exp.finish(summary, markdown, notes=notes, sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
