"""Scoring speed: the batched scorer against a per-sentence loop and the matmul peak, fp32 vs bf16.

Runs ``benchmarks/bench_scoring.py`` (its :func:`measure`) and renders its table with the targets
the benchmark records; the full-evaluation row is read from ``experiments/eval_embedded.py``'s
result when the benchmark did not time it (``--full``).

    python experiments/bench_scoring.py            # --sample 600 --bf16-sample 30, as published
                                                   # (~2.5 min on 2 AVX2 cores from the recorded timings, bf16 emulated)
    python experiments/bench_scoring.py --quick --results-dir /tmp/r   # 30 sentences (~70 s)

A measurement already in ``results/bench_scoring.json`` (the benchmark's CLI) or
``results/bench_scoring/bench_scoring.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import json
import sys

from bench_common import fmt, load_benchmark, measured, measurement_notes, verdict
from common import Experiment, markdown_table


def legacy_options(data: dict) -> dict:
    """The options a file written before ``options`` were recorded states of itself."""
    batched = data.get("batched", {})
    # batch_size and bf16_sample were not recorded: their command-line defaults then (32, 60)
    stated = {"model": data.get("model"), "sample": batched.get("fp32", {}).get("sentences"), "full": "full" in data,
              "batch_size": 32, "bf16_sample": 60}
    bf16 = batched.get("bf16", {}).get("sentences")
    if bf16 is not None and bf16 < stated["sample"]:  # the bf16 sample was cut to --bf16-sample
        stated["bf16_sample"] = bf16
    return stated


def full_evaluation(exp: Experiment, model: str) -> tuple[dict | None, object]:
    """Seconds of the whole-set fp32 StereoSet + CrowS-Pairs evaluation of ``eval_embedded``, if it ran."""
    path = exp.path(f"{model.replace('/', '_')}_all.json")
    if not path.is_file():
        return None, None
    data = json.loads(path.read_text())
    config = data.get("config", {})
    if config.get("split") != "all" or config.get("limit") is not None or config.get("dtype") != "fp32":
        return None, None
    seconds = {k: data["benchmarks"][k]["seconds"] for k in ("stereoset", "crows-pairs") if k in data["benchmarks"]}
    return (seconds if len(seconds) == 2 else None), path


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--model", default="smollm2-135m-instruct", help="Model to score with.")
        parser.add_argument("--sample", type=int, default=600, help="StereoSet sentences in the speed sample.")
        parser.add_argument("--bf16-sample", type=int, default=30, help="Sentences for bf16 where bf16 is slow.")
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--full", action="store_true", help="Also time the whole evaluation in each dtype.")

    exp, args = Experiment.start("bench_scoring", "Scoring speed: batched scorer vs a per-sentence loop, fp32 vs bf16", argv, options)
    opts = {"model": args.model, "sample": 30 if args.quick else args.sample,
            "bf16_sample": 6 if args.quick else args.bf16_sample, "batch_size": 8 if args.quick else args.batch_size,
            "full": args.full and not args.quick}
    bench = load_benchmark("bench_scoring")
    data, path, unrecorded = measured(exp, "bench_scoring", opts, lambda: bench.measure(
        opts["model"], opts["sample"], opts["bf16_sample"], opts["batch_size"], opts["full"]), legacy_options)

    targets, peaks, b = data["targets"], data["matmul_peak_gflops"], data["batched"]
    fp32, bf16, shared, loop = b["fp32"], b["bf16"], b["fp32_shared_prefix"], data["per_sentence_loop_fp32"]
    least = targets["fraction_of_peak"]
    rows = [["matmul peak fp32 / bf16", f"{peaks['fp32']:.1f} / {peaks['bf16']:.1f} GFLOP/s", "-"]]
    rows.append(["batched scorer, fp32",
                 f"{fp32['sentences_per_s']:.1f} sentences/s, {fp32['gflops']:.1f} GFLOP/s = {100 * fp32['fraction_of_peak']:.0f} % of peak",
                 f">= {100 * least:.0f} % of peak: {verdict(fp32['fraction_of_peak'], least, True)}"])
    instead = f" instead of {fp32['tokens']:,}" if shared["sentences"] == fp32["sentences"] else ""
    rows.append(["batched scorer + shared prefix (what `eval` uses for StereoSet), fp32",
                 f"{shared['sentences_per_s']:.1f} sentences/s, {shared['gflops']:.1f} GFLOP/s = "
                 f"{100 * shared['fraction_of_peak']:.0f} % of peak; {shared['tokens_computed']:,} tokens computed{instead}", "-"])
    slower = fp32["sentences_per_s"] / bf16["sentences_per_s"]
    rows.append([f"batched scorer, bf16 autocast ({bf16['sentences']} sentences)",
                 f"{bf16['sentences_per_s']:.1f} sentences/s, {bf16['gflops']:.1f} GFLOP/s = {100 * bf16['fraction_of_peak']:.0f} % of the bf16 peak",
                 f">= {100 * least:.0f} %: {verdict(bf16['fraction_of_peak'], least, True)}"
                 + (f", but bf16 is {slower:.0f}x *slower* than fp32 here" if slower > 1 else "")])
    rows.append([f"per-sentence loop (one forward per sentence, as bias-bench), fp32 ({loop['sentences']} sentences)",
                 f"{loop['sentences_per_s']:.1f} sentences/s", "-"])
    speedup = targets["speedup_vs_loop"]
    met = [name for name, key in (("batched", "speedup_of_batched"), ("with shared prefix", "speedup_of_shared_prefix"))
           if loop[key] >= speedup]
    rows.append(["speed-up over the per-sentence loop",
                 f"{loop['speedup_of_batched']:.1f}x batched, **{loop['speedup_of_shared_prefix']:.1f}x** with shared prefix",
                 f">= {speedup:g}x: " + ("met " + " and ".join(met) if met else "missed")])
    agree, full = data["bf16_vs_fp32"], data.get("full", {})
    ss_target = targets["ss_lms_bf16_vs_fp32"]
    both = {k: full[k] for k in ("fp32", "bf16") if "ss" in full.get(k, {})}
    gap = max(abs(both["fp32"][m] - both["bf16"][m]) for m in ("ss", "lms")) if len(both) == 2 else None
    rows.append([f"bf16 vs fp32 on {agree['clusters']} clusters",
                 f"max abs. difference of mean log-prob {agree['max_abs_diff_mean_logp']:.3f}; same stereotype/anti "
                 f"decision in {100 * agree['same_stereotype_decision']:.0f} %",
                 f"SS/LMS within {ss_target:g} points (full run): {verdict(gap, ss_target, False)}"])

    sources = [path]
    seconds_target = targets["full_eval_seconds_bf16"]
    if "seconds" in full.get("fp32", {}):
        fp32_full, how = full["fp32"]["seconds"], "timed by the benchmark"
    else:
        parts, eval_path = full_evaluation(exp, opts["model"])
        fp32_full = sum(parts.values()) if parts else None
        how = (f"{fmt(parts['stereoset'], 0)} + {fmt(parts['crows-pairs'], 0)}, from `experiments/eval_embedded.py`"
               if parts else "run `experiments/eval_embedded.py`")
        if parts:
            sources.append(eval_path)
    bf16_full = full.get("bf16", {})
    if "seconds" in bf16_full:
        bf16_cell = f"{verdict(bf16_full['seconds'], seconds_target, False)} ({fmt(bf16_full['seconds'], 0)} s)"
    elif fp32_full is not None:  # bf16 not timed: the fp32 time scaled by the measured sentence rates
        projected = bf16_full.get("projected_seconds") or fp32_full * slower
        bf16_cell = f"**{verdict(projected, seconds_target, False)}** (projected {projected / 60:,.0f} min in bf16 here)"
    else:
        bf16_cell = "not measured"
    rows.append(["full StereoSet (intra + inter) + CrowS-Pairs, fp32", f"{fmt(fp32_full, 0, ' s')} ({how})",
                 f"<= {seconds_target:g} s in bf16: {bf16_cell}"])
    markdown = markdown_table(["measurement", "value", "target"], rows, "lll")

    notes = (measurement_notes(data, path, exp, unrecorded, data.get("threads"))
             + f"  CPU capability {data.get('cpu_capability')}.  FLOPs are counted as 2 x {data['params'] / 1e6:.1f}M parameters "
             f"per real token; the peak is the best `F.linear` of {data.get('matmul_peak_size', 'n/a')}-square operands in the same "
             "dtype (bf16 = fp32 tensors under bf16 autocast, as the scorer runs).  The bf16 projection scales the fp32 "
             "evaluation time by the fp32/bf16 sentence-rate ratio of this run.")
    summary = {"options": opts, "unrecorded_options": unrecorded, "targets": targets, "matmul_peak_gflops": peaks,
               "batched": b, "per_sentence_loop_fp32": loop, "bf16_vs_fp32": agree, "full_eval_fp32_seconds": fp32_full}
    headline = [("Scoring speed-up over a per-sentence loop (batched, shared prefix; fp32)",
                 f"{loop['speedup_of_shared_prefix']:.1f}x (target >= {speedup:g}x)")]
    exp.finish(summary, markdown, notes=notes, sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
