"""Unlearning step cost: adapter-disabled reference vs a second model copy, fp32 vs bf16 autocast.

One run measures, each configuration in a fresh process (so peak memory is its own):

* seconds per BiasUnlearn optimizer step (forget + retain + KL batches, reference passes included),
  median over ``--steps`` after one warm-up step;
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak RSS;
* achieved GFLOP/s, counting 6 x params FLOPs per policy token (forward + backward) and
  2 x params per reference token.

bf16 is measured only where a quick matmul probe shows it is not much slower than fp32 (on
CPUs without bf16 units it is emulated and ~100x slower); otherwise the row says why it was skipped.

Usage: ``python benchmarks/bench_unlearn.py [--steps 3] [--batch-size 8] [--out results/bench_unlearn.json]``;
from Python, :func:`measure` takes the same options and returns the results.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time

import torch

from benchlib import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)

CONFIGS = [("adapter", "fp32"), ("copy", "fp32"), ("adapter", "bf16")]


def _measure(reference: str, dtype: str, model_name: str, steps: int, batch_size: int, queue) -> None:
    from amendlm.data.stereoset import load_stereoset
    from amendlm.data.text import load_texts
    from amendlm.modeling import load_model
    from amendlm.unlearn.artifacts import StepLog
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.trainer import UnlearnTrainer

    with tempfile.TemporaryDirectory() as out:
        config = UnlearnConfig(out=out, model=model_name, reference=reference, dtype=dtype, batch_size=batch_size,
                               max_steps=steps + 1, kl_text_limit=50)
        model, tokenizer = load_model(model_name)
        n_params = sum(p.numel() for p in model.parameters())
        trainer = UnlearnTrainer(config, model, tokenizer, load_stereoset(), load_texts("xsum-sample", "document")[:50])
        log = StepLog(trainer.out / "log.jsonl")
        cuda = trainer.accelerator.device.type == "cuda"
        seconds, tokens = [], []
        for index in range(steps + 1):
            began = time.perf_counter()
            trainer.train_step(log)
            if cuda:
                torch.cuda.synchronize()
            if index:  # the first step warms up allocators and kernels
                seconds.append(time.perf_counter() - began)
        for name, stream in trainer.streams.items():
            tokens.append((name, statistics.mean(len(e.ids) for e in stream)))
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean_len = dict(tokens)
    policy_tokens = batch_size * sum(mean_len.values())
    reference_tokens = batch_size * sum(mean_len[s] for s in trainer.method.reference_streams)
    flops = 6 * n_params * policy_tokens + 2 * n_params * reference_tokens
    step = statistics.median(seconds)
    queue.put({"reference": reference, "dtype": dtype, "seconds_per_step": step, "peak_memory_mib": peak,
               "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss", "gflops_per_s": flops / step / 1e9,
               "params": n_params, "mean_tokens_per_example": mean_len})


def run(reference: str, dtype: str, model_name: str, steps: int, batch_size: int) -> dict:
    """Measure one configuration in a fresh (spawned) process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(reference, dtype, model_name, steps, batch_size, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def measure(model_name: str = "smollm2-135m-instruct", steps: int = 3, batch_size: int = 8) -> dict:
    """Run the benchmark (options as the CLI's; each configuration in a fresh process) and return the results."""
    from amendlm.report import package_versions

    options = {"model": model_name, "steps": steps, "batch_size": batch_size}
    fp32, bf16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    rows = []
    for reference, dtype in CONFIGS:
        if dtype == "bf16" and not torch.cuda.is_available() and bf16 < 0.5 * fp32:
            rows.append({"reference": reference, "dtype": dtype, "skipped": f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f}: emulated here"})
            continue
        rows.append(run(reference, dtype, model_name, steps, batch_size))
    base = next(r for r in rows if r["reference"] == "adapter" and r["dtype"] == "fp32")
    for row in rows:
        if "seconds_per_step" in row:
            row["time_vs_adapter_fp32"] = row["seconds_per_step"] / base["seconds_per_step"]
            row["memory_vs_adapter_fp32"] = row["peak_memory_mib"] / base["peak_memory_mib"]
            row["fraction_of_matmul_peak"] = row["gflops_per_s"] / (bf16 if row["dtype"] == "bf16" else fp32)
    print(f"matmul peak: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s; batch {batch_size} per stream")
    print(f"{'reference':<9} {'dtype':<5} {'s/step':>7} {'x time':>7} {'peak MiB':>9} {'x mem':>6} {'GFLOP/s':>8}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['reference']:<9} {row['dtype']:<5} skipped: {row['skipped']}")
        else:
            print(f"{row['reference']:<9} {row['dtype']:<5} {row['seconds_per_step']:7.2f} {row['time_vs_adapter_fp32']:7.2f} "
                  f"{row['peak_memory_mib']:9.0f} {row['memory_vs_adapter_fp32']:6.2f} {row['gflops_per_s']:8.1f}")
    return {"options": options, "matmul_gflops": {"fp32": fp32, "bf16": bf16}, "batch_size": batch_size,
            "steps": steps, "rows": rows, "versions": package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    results = measure(args.model, args.steps, args.batch_size)
    if args.out:
        from amendlm.report import atomic_write_json

        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
