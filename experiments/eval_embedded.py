"""The embedded model on every benchmark: StereoSet (whole dev set, per task and bias type),
CrowS-Pairs (per bias type) and WikiText perplexity.

    python experiments/eval_embedded.py            # fp32, as published (~15 min on 2 AVX2 cores)
    python experiments/eval_embedded.py --quick --results-dir /tmp/r   # 6 examples per benchmark
"""

from __future__ import annotations

import sys

from common import Experiment, markdown_table, run_eval


def full_eval_markdown(data: dict) -> str:
    """The tables of a whole-dev-set evaluation (:func:`amendlm.bias.evaluate.evaluate_model`'s dict):
    StereoSet per task and bias type, CrowS-Pairs per bias type, and the perplexity line."""
    stereoset = data["benchmarks"]["stereoset"]["scores"]
    rows = []
    for task in ("intrasentence", "intersentence", "overall"):
        for bias_type, s in sorted(stereoset[task].items(), key=lambda kv: (kv[0] == "overall", kv[0])):
            label = f"**{bias_type}**" if bias_type == "overall" else bias_type
            rows.append([task, label, s["ss"], s["lms"], s["icat"], s["n_clusters"], s["n_targets"]])
    stereoset_md = markdown_table(["task", "bias type", "SS", "LMS", "ICAT", "clusters", "targets"], rows, "llrrrrr")

    crows = data["benchmarks"]["crows-pairs"]["scores"]
    crows_rows = [[f"**{t}**" if t == "overall" else t, s["metric"], s["stereo_metric"], s["antistereo_metric"], s["n_pairs"], s["n_ties"]]
                  for t, s in sorted(crows.items(), key=lambda kv: (kv[0] == "overall", kv[0]))]
    crows_md = markdown_table(["CrowS-Pairs bias type", "metric", "stereo", "antistereo", "pairs", "ties"], crows_rows)

    ppl = data["benchmarks"]["perplexity"]
    return "\n\n".join([
        stereoset_md, crows_md,
        f"WikiText-sample perplexity: **{ppl['perplexity']:.2f}** over {ppl['n_tokens']:,} tokens "
        f"(window {ppl['window']}, stride {ppl['stride']}).",
    ])


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--model", default="smollm2-135m-instruct", help="Model to evaluate (embedded name, directory or hub id).")
        parser.add_argument("--dtype", default="fp32", help="fp32 (exact, default), bf16 or auto.")

    exp, args = Experiment.start("eval_embedded", "The embedded model on every benchmark (whole StereoSet dev set)", argv, options)
    name = args.model.replace("/", "_")
    limit = 6 if args.quick else None
    path = exp.path(f"{name}_all.json") if args.dtype == "fp32" else exp.path(f"{name}_all_{args.dtype}.json")
    data = run_eval(exp, path, args.model, split="all", limit=limit, dtype=args.dtype)

    markdown = full_eval_markdown(data)
    stereoset = data["benchmarks"]["stereoset"]["scores"]
    crows = data["benchmarks"]["crows-pairs"]["scores"]
    ppl = data["benchmarks"]["perplexity"]
    seconds = {k: round(v["seconds"]) for k, v in data["benchmarks"].items()}
    notes = (f"Model `{data['model']}`, dtype {data['config']['dtype']}, batch {data['config']['batch_size']}, "
             f"start token `{(data.get('start_token') or {}).get('token', 'BOS (not recorded)')}`.  Ideal SS is 50 and LMS 100.  Seconds per benchmark: "
             + ", ".join(f"{k} {v}" for k, v in seconds.items()) + ".")
    summary = {"config": data["step_config"] if "step_config" in data else data["config"],
               "stereoset": stereoset, "crows_pairs": crows, "perplexity": ppl["perplexity"]}
    o = stereoset["overall"]["overall"]
    headline = [(f"`{data['model']}`, whole StereoSet dev set: SS / LMS / ICAT; CrowS-Pairs; WikiText perplexity ({data['config']['dtype']})",
                 f"{o['ss']:.2f} / {o['lms']:.2f} / {o['icat']:.2f}; {crows['overall']['metric']:.2f}; {ppl['perplexity']:.2f}")]
    exp.finish(summary, markdown, notes=notes, sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
