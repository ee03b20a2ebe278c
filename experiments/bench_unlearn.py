"""BiasUnlearn training-step cost: the adapter-disabled reference against a second frozen copy, fp32 vs bf16.

Runs ``benchmarks/bench_unlearn.py`` (its :func:`measure`; each configuration in a fresh process,
so that peak memory is its own) and renders its table.

    python experiments/bench_unlearn.py            # 3 timed steps, batch 8 per stream, as published
                                                   # (~3 min: 3 x 4 steps of ~10 s + model loads; bf16 skipped where emulated)
    python experiments/bench_unlearn.py --quick --results-dir /tmp/r   # 1 step, batch 1 (~65 s)

A measurement already in ``results/bench_unlearn.json`` (the benchmark's CLI) or
``results/bench_unlearn/bench_unlearn.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import sys

from bench_common import fmt, load_benchmark, measured, measurement_notes
from common import Experiment, markdown_table

REFERENCES = {"adapter": "base under the disabled adapter", "copy": "second frozen copy"}
DEFAULT_REFERENCE = "adapter"  # amendlm debias's default (UnlearnConfig.reference)
DTYPES = {"fp32": "fp32", "bf16": "bf16 autocast"}
MEMORY = {"process_peak_rss": "peak RSS", "cuda_max_allocated": "peak CUDA memory"}


def legacy_options(data: dict) -> dict:
    """The options a file written before ``options`` were recorded states of itself; the model was not
    recorded and was the command-line default then (the embedded model)."""
    return {"model": "smollm2-135m-instruct", **{k: data[k] for k in ("steps", "batch_size") if k in data}}


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--model", default="smollm2-135m-instruct", help="Model to unlearn on.")
        parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps (after one warm-up step).")
        parser.add_argument("--batch-size", type=int, default=8, help="Examples per stream per step.")

    exp, args = Experiment.start("bench_unlearn", "BiasUnlearn training-step cost: reference model and dtype", argv, options)
    opts = {"model": args.model, "steps": 1 if args.quick else args.steps, "batch_size": 1 if args.quick else args.batch_size}
    bench = load_benchmark("bench_unlearn")
    data, path, unrecorded = measured(exp, "bench_unlearn", opts, lambda: bench.measure(opts["model"], opts["steps"], opts["batch_size"]),
                                      legacy_options)

    rows, kinds = [], set()
    for row in data["rows"]:
        default = row["reference"] == DEFAULT_REFERENCE and row["dtype"] == "fp32"
        label = REFERENCES.get(row["reference"], row["reference"]) + (" (default)" if default else "")
        dtype = DTYPES.get(row["dtype"], row["dtype"])
        if "skipped" in row:
            rows.append([label, dtype, f"skipped: {row['skipped']}", "", "", "", ""])
            continue
        kinds.add(row["memory_kind"])
        rows.append([label, dtype, f"{row['seconds_per_step']:.2f}", f"{row['time_vs_adapter_fp32']:.2f}",
                     fmt(row["peak_memory_mib"], 0, " MiB"), f"{row['memory_vs_adapter_fp32']:.2f}",
                     f"{row['gflops_per_s']:.1f} ({100 * row['fraction_of_matmul_peak']:.0f} % of peak)"])
    memory = " / ".join(MEMORY.get(k, k) for k in sorted(kinds)) or "peak memory"
    markdown = markdown_table(["reference model", "dtype", "s / step", "time vs adapter fp32", memory,
                               "memory vs adapter fp32", "GFLOP/s"], rows, "llrrrrr")

    measured_rows = [r for r in data["rows"] if "seconds_per_step" in r]
    tokens = measured_rows[0]["mean_tokens_per_example"] if measured_rows else {}
    notes = (measurement_notes(data, path, exp, unrecorded, "not recorded")
             + f"  Batch {data['batch_size']} per stream, median of {data['steps']} optimizer steps after a warm-up step, "
             "each configuration in a fresh process.  FLOPs: 6 x parameters per policy token (forward + backward) and "
             "2 x parameters per reference token; mean tokens per example: "
             + ", ".join(f"{k} {v:.1f}" for k, v in tokens.items()) + ".  A step is forget + retain + KL batches, "
             "reference passes included.")
    summary = {"options": opts, "unrecorded_options": unrecorded, "matmul_gflops": data["matmul_gflops"], "rows": data["rows"]}
    copy = next((r for r in measured_rows if r["reference"] == "copy" and r["dtype"] == "fp32"), None)
    headline = [("BiasUnlearn step, disabled-adapter reference vs a second frozen copy (fp32): time / memory",
                 f"{1 / copy['time_vs_adapter_fp32']:.2f}x / {1 / copy['memory_vs_adapter_fp32']:.2f}x of the copy's")] if copy else []
    exp.finish(summary, markdown, notes=notes, sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
