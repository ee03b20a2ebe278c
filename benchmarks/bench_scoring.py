"""Scoring speed: batched scorer vs a per-sentence loop, fp32 vs bf16, against the matmul peak.

One run prints everything, measured side by side on the same machine:

* the machine's matmul peak (GFLOP/s) for fp32 and bf16 (square matmuls, best of a few);
* sentences/s and achieved GFLOP/s (2 x params FLOPs per real token) of the batched scorer on a
  StereoSet sample, in fp32 and under bf16 autocast, and the fraction of the dtype's peak;
* the same in fp32 with the shared-prefix packing that ``amendlm eval`` uses for StereoSet;
* the same sample scored one sentence per forward pass (as bias-bench does) and the speed-up;
* with ``--full``: full StereoSet (intra + inter) + CrowS-Pairs in wall-clock seconds for each
  dtype that is fast enough here, and the SS / LMS difference between the dtypes.

Usage: ``python benchmarks/bench_scoring.py [--sample 600] [--full] [--out results/bench_scoring.json]``;
from Python, :func:`measure` takes the same options and returns the report.
"""

from __future__ import annotations

import argparse
import time

import torch

from amendlm.bias.evaluate import EvalConfig, run_crows_pairs, run_stereoset
from amendlm.data.stereoset import LABELS, load_stereoset
from amendlm.modeling import autocast, load_model
from amendlm.report import atomic_write_json, package_versions
from amendlm.scoring import encode_pairs, pack_group, score_encoded, score_grouped

from benchlib import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)

TARGETS = {"speedup_vs_loop": 5.0, "fraction_of_peak": 0.35, "full_eval_seconds_bf16": 240.0, "ss_lms_bf16_vs_fp32": 0.5}


def time_batched(model, encoded, pad_id, dtype, batch_size) -> float:
    began = time.perf_counter()
    score_encoded(model, encoded, pad_id, batch_size=batch_size, dtype=dtype)
    return time.perf_counter() - began


@torch.inference_mode()
def time_per_sentence(model, encoded, dtype) -> float:
    """One forward pass per sentence, no batching (the bias-bench recipe)."""
    began = time.perf_counter()
    for item in encoded:
        with autocast(dtype):
            logits = model(input_ids=torch.tensor([item.ids])).logits
        torch.log_softmax(logits.float(), dim=-1)
    return time.perf_counter() - began


def measure(model_name: str = "smollm2-135m-instruct", sample: int = 600, bf16_sample: int = 60, batch_size: int = 32,
            full: bool = False) -> dict:
    """Run the benchmark (options as the CLI's) and return the report (it records its ``options``)."""
    options = {"model": model_name, "sample": sample, "bf16_sample": bf16_sample, "batch_size": batch_size, "full": full}
    model, tokenizer = load_model(model_name)
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 2 * n_params
    clusters = load_stereoset()
    step = max(1, len(clusters) // (sample // 3))  # spread over intra and inter
    pairs = [c.scoring_pair(label) for c in clusters[::step] for label in LABELS][:sample]
    encoded = encode_pairs(tokenizer, pairs)
    pad_id = tokenizer.pad_token_id
    report: dict = {"options": options, "model": model_name, "params": n_params, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "targets": TARGETS}

    print(f"{model_name}: {n_params / 1e6:.1f}M params, {torch.get_num_threads()} threads, CPU {report['cpu_capability']}")
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    report["matmul_peak_gflops"] = peaks
    report["matmul_peak_size"] = 1536
    print(f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    report["batched"] = {}
    for name, dtype in dtypes.items():
        # bf16 without native units is orders of magnitude slower: time a smaller sample
        sample = encoded if name == "fp32" or peaks["bf16"] > 0.5 * peaks["fp32"] else encoded[: bf16_sample]
        time_batched(model, sample[: batch_size], pad_id, dtype, batch_size)  # warm-up
        seconds = time_batched(model, sample, pad_id, dtype, batch_size)
        tokens = sum(len(e.ids) for e in sample)
        gflops = tokens * flops_per_token / seconds / 1e9
        entry = {"sentences": len(sample), "tokens": tokens, "seconds": seconds, "sentences_per_s": len(sample) / seconds,
                 "gflops": gflops, "fraction_of_peak": gflops / peaks[name]}
        report["batched"][name] = entry
        print(f"batched {name}: {entry['sentences_per_s']:.1f} sentences/s, {gflops:.1f} GFLOP/s = "
              f"{100 * entry['fraction_of_peak']:.0f}% of the {name} matmul peak ({len(sample)} sentences)")

    # bf16 numerics: mean log-probs and StereoSet decisions on the bf16 sample vs fp32
    agree = encoded[: 3 * (bf16_sample // 3)]
    means = {name: score_encoded(model, agree, pad_id, batch_size, dtype).logp_mean.view(-1, 3) for name, dtype in dtypes.items()}
    same_pro = ((means["fp32"][:, 0] > means["fp32"][:, 1]) == (means["bf16"][:, 0] > means["bf16"][:, 1])).float().mean()
    report["bf16_vs_fp32"] = {"clusters": len(agree) // 3, "max_abs_diff_mean_logp": float((means["fp32"] - means["bf16"]).abs().max()),
                              "same_stereotype_decision": float(same_pro)}
    print(f"bf16 vs fp32 on {len(agree) // 3} clusters: max |d mean log-prob| {report['bf16_vs_fp32']['max_abs_diff_mean_logp']:.4f}, "
          f"same stereotype/anti decision in {100 * float(same_pro):.0f}%")

    # shared-prefix packing: the three candidates of a context in one sequence (fp32)
    groups = [list(range(i, i + 3)) for i in range(0, len(encoded) - len(encoded) % 3, 3)]
    grouped = encoded[: 3 * len(groups)]
    score_grouped(model, grouped[:9], groups[:3], pad_id, batch_size=3)  # warm-up
    began = time.perf_counter()
    score_grouped(model, grouped, groups, pad_id, batch_size=max(1, batch_size // 3))
    seconds = time.perf_counter() - began
    computed = sum(len(pack_group([grouped[i] for i in g], g).ids) for g in groups)
    gflops = computed * flops_per_token / seconds / 1e9
    entry = {"sentences": len(grouped), "tokens_computed": computed, "seconds": seconds, "sentences_per_s": len(grouped) / seconds,
             "gflops": gflops, "fraction_of_peak": gflops / peaks["fp32"]}
    report["batched"]["fp32_shared_prefix"] = entry
    print(f"batched fp32 + shared prefix: {entry['sentences_per_s']:.1f} sentences/s, {gflops:.1f} GFLOP/s = "
          f"{100 * entry['fraction_of_peak']:.0f}% of peak ({computed} tokens computed instead of "
          f"{sum(len(e.ids) for e in grouped)})")

    loop_sample = encoded[: min(len(encoded), 200)]
    loop_seconds = time_per_sentence(model, loop_sample, torch.float32)
    loop_rate = len(loop_sample) / loop_seconds
    speedup = report["batched"]["fp32"]["sentences_per_s"] / loop_rate
    speedup_shared = report["batched"]["fp32_shared_prefix"]["sentences_per_s"] / loop_rate
    report["per_sentence_loop_fp32"] = {"sentences": len(loop_sample), "sentences_per_s": loop_rate,
                                        "speedup_of_batched": speedup, "speedup_of_shared_prefix": speedup_shared}
    print(f"per-sentence loop fp32: {loop_rate:.1f} sentences/s -> batched scorer {speedup:.1f}x faster, "
          f"with shared prefix {speedup_shared:.1f}x")

    if full:
        report["full"] = {}
        for name in dtypes:
            rate = report["batched"][name]["sentences_per_s"]
            projected = (3 * len(clusters) + 2 * 1508) / rate
            if projected > 3600:
                print(f"full eval {name}: skipped, projected {projected / 60:.0f} min at {rate:.1f} sentences/s")
                report["full"][name] = {"skipped": True, "projected_seconds": projected}
                continue
            config = EvalConfig(dtype=name, batch_size=batch_size, progress=False)
            began = time.perf_counter()
            stereoset = run_stereoset(model, tokenizer, config)["scores"]["overall"]["overall"]
            crows = run_crows_pairs(model, tokenizer, config)["scores"]["overall"]
            seconds = time.perf_counter() - began
            report["full"][name] = {"seconds": seconds, "ss": stereoset["ss"], "lms": stereoset["lms"], "icat": stereoset["icat"], "crows": crows["metric"]}
            print(f"full StereoSet + CrowS-Pairs {name}: {seconds:.0f} s; SS {stereoset['ss']:.2f} LMS {stereoset['lms']:.2f} CrowS {crows['metric']:.2f}")
        fp32, bf16 = report["full"].get("fp32", {}), report["full"].get("bf16", {})
        if "ss" in fp32 and "ss" in bf16:
            print(f"bf16 vs fp32: |dSS| {abs(fp32['ss'] - bf16['ss']):.2f}, |dLMS| {abs(fp32['lms'] - bf16['lms']):.2f}")

    report["versions"] = package_versions()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sample", type=int, default=600, help="StereoSet sentences in the speed sample")
    parser.add_argument("--bf16-sample", type=int, default=60, help="sentences for bf16 when bf16 is slow here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--full", action="store_true", help="also time the full StereoSet + CrowS-Pairs evaluation")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = measure(args.model, args.sample, args.bf16_sample, args.batch_size, args.full)
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
