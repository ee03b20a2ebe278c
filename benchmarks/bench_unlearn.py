"""Unlearning step cost: batch shape, packed vs padded rows, reference model and dtype.

One run measures, each configuration in a fresh process (so peak memory is its own):

* seconds per BiasUnlearn optimizer step (forget + retain + KL batches, reference passes included),
  median over ``--steps`` after one warm-up step (and the fastest step), wall clock and CPU time of
  the process (all its threads; on a machine shared with other jobs the CPU time is the steadier);
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak RSS;
* achieved GFLOP/s and its fraction of the fp32 (or bf16) matmul peak measured at the start of
  the same run (:func:`benchlib.matmul_peak_gflops`).  FLOPs are *nominal*: 6 x params per
  policy token (forward + backward) and 2 x params per reference token of the examples drawn
  in the timed steps (DESIGN.md §6), padding excluded and the same count whether the rows are
  packed or padded and whether a reference log-prob came from the cache, so the fraction of
  peak of a packed row is its speed-up times the padded row's.  (With LoRA the frozen base
  weights get no gradient, so a real backward pass is nearer 2 x params than 4 x: the fraction
  is a speed figure, not a hardware counter.)

The configurations (:data:`CONFIGS`): the default recipe's BiasUnlearn at 8 / 8 / 8 examples per
stream (``--batch-size``) and the ``official`` recipe's 4 / 28 / 28, each padded
(``packing=False``) and packed (``packing=True``: :mod:`amendlm.unlearn.forward`); the second
frozen copy as reference, and bf16 autocast.  bf16 is measured only where a quick matmul probe
shows it is not much slower than fp32 (on CPUs without bf16 units it is emulated and ~8x slower);
otherwise the row says why it was skipped.

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
from typing import Sequence

import torch

from benchlib import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)

# (recipe, packing, reference, dtype); the default recipe runs --batch-size per stream, official 4 / 28 / 28
CONFIGS = [
    ("default", False, "adapter", "fp32"), ("default", True, "adapter", "fp32"),
    ("official", False, "adapter", "fp32"), ("official", True, "adapter", "fp32"),
    ("default", False, "copy", "fp32"), ("default", False, "adapter", "bf16"), ("official", True, "adapter", "bf16"),
]
BASELINE = ("default", False, "adapter", "fp32")  # the row every ratio is taken against


def config_label(recipe: str, packing: bool, reference: str, dtype: str) -> str:
    """A configuration as a short stable name, e.g. ``official/packed/adapter/fp32``."""
    return f"{recipe}/{'packed' if packing else 'padded'}/{reference}/{dtype}"


def _measure(spec: tuple, model_name: str, steps: int, batch_size: int, queue) -> None:
    from amendlm.data.stereoset import load_stereoset
    from amendlm.data.text import load_texts
    from amendlm.modeling import load_model
    from amendlm.unlearn.artifacts import StepLog
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.packing import pack_examples
    from amendlm.unlearn.trainer import UnlearnTrainer

    recipe, packing, reference, dtype = spec
    with tempfile.TemporaryDirectory() as out:
        options = {"model": model_name, "reference": reference, "dtype": dtype, "packing": packing,
                   "max_steps": steps + 1, "kl_text_limit": 50}
        if recipe == "default":
            options["batch_size"] = batch_size
        config = UnlearnConfig.from_recipe(recipe, out, options)
        model, tokenizer = load_model(model_name)
        n_params = sum(p.numel() for p in model.parameters())
        texts = load_texts("xsum-sample", "document")[:50] if config.kl_texts else []
        trainer = UnlearnTrainer(config, model, tokenizer, load_stereoset(), texts)
        log = StepLog(trainer.out / "log.jsonl")
        cuda = trainer.accelerator.device.type == "cuda"
        drawn, next_batches = [], trainer._next_batches

        def recording():  # the examples each step draws, for the FLOP count
            batches = next_batches()
            drawn.append(batches)
            return batches

        trainer._next_batches = recording
        seconds, cpu_seconds = [], []
        for index in range(steps + 1):
            began, began_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(log)
            if cuda:
                torch.cuda.synchronize()
            if index:  # the first step warms up allocators and kernels
                seconds.append(time.perf_counter() - began)
                cpu_seconds.append(time.process_time() - began_cpu)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = drawn[1:]
    reference_streams = trainer.method.reference_streams
    policy_tokens = statistics.mean(sum(len(e.ids) for b in batches.values() for e in b) for batches in timed)
    reference_tokens = statistics.mean(sum(len(e.ids) for name in reference_streams for e in batches[name])
                                       for batches in timed)
    padded_tokens = statistics.mean(sum(len(b) * max(len(e.ids) for e in b) for b in batches.values()) for batches in timed)
    packed_tokens = statistics.mean(
        pack_examples([e for b in batches.values() for e in b], 0).inputs["input_ids"].numel() for batches in timed)
    flops = 6 * n_params * policy_tokens + 2 * n_params * reference_tokens
    step = statistics.median(seconds)
    cache = trainer.passes.cache
    queue.put({"recipe": recipe, "packing": packing, "reference": reference, "dtype": dtype,
               "label": config_label(*spec), "batch_sizes": {name: config.stream_batch_size(name) for name in trainer.method.streams},
               "seconds_per_step": step, "best_seconds_per_step": min(seconds),
               "cpu_seconds_per_step": statistics.median(cpu_seconds), "peak_memory_mib": peak,
               "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss", "gflops_per_s": flops / step / 1e9,
               "params": n_params, "policy_tokens_per_step": policy_tokens, "reference_tokens_per_step": reference_tokens,
               "padded_tokens_per_step": padded_tokens, "packed_tokens_per_step": packed_tokens,
               "packing_fallback": trainer.passes.fallback,
               "reference_cache_hit_rate": cache.hits / cache.lookups if cache is not None and cache.lookups else None})


def run(spec: tuple, model_name: str, steps: int, batch_size: int) -> dict:
    """Measure one configuration (:data:`CONFIGS` entry) in a fresh (spawned) process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(spec, model_name, steps, batch_size, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def measure(model_name: str = "smollm2-135m-instruct", steps: int = 3, batch_size: int = 8,
            configs: Sequence[str] | None = None) -> dict:
    """Run the benchmark (options as the CLI's; each configuration in a fresh process) and return the results.

    ``configs``: labels (:func:`config_label`) of the :data:`CONFIGS` to run (default: all; the
    :data:`BASELINE` always runs).

    Raises:
        ValueError: an unknown label in ``configs`` (lists the valid ones).

    Returns:
        ``{"options", "matmul_gflops": {"fp32", "bf16"}, "batch_size", "steps", "torch_threads",
        "rows": [...], "versions"}``; each row has ``seconds_per_step``, ``fraction_of_matmul_peak``,
        ``time_vs_baseline`` (against :data:`BASELINE`), ``speedup_vs_padded`` (packed rows:
        against the padded row of the same recipe, reference and dtype), or ``skipped`` with the reason.
    """
    from amendlm.report import package_versions

    labels = [config_label(*c) for c in CONFIGS]
    unknown = sorted(set(configs or ()) - set(labels))
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; valid: {', '.join(labels)}")
    chosen = [c for c in CONFIGS if configs is None or c == BASELINE or config_label(*c) in configs]
    options = {"model": model_name, "steps": steps, "batch_size": batch_size, "configs": [config_label(*c) for c in chosen]}
    fp32, bf16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    rows = []
    for spec in chosen:
        if spec[3] == "bf16" and not torch.cuda.is_available() and bf16 < 0.5 * fp32:
            rows.append({"recipe": spec[0], "packing": spec[1], "reference": spec[2], "dtype": spec[3], "label": config_label(*spec),
                         "skipped": f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f}: emulated here"})
            continue
        rows.append(run(spec, model_name, steps, batch_size))
        print(f"{rows[-1]['label']}: {rows[-1]['seconds_per_step']:.2f} s/step", flush=True)
    by_label = {row["label"]: row for row in rows}
    base = by_label[config_label(*BASELINE)]
    for row in rows:
        if "seconds_per_step" not in row:
            continue
        row["time_vs_baseline"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["memory_vs_baseline"] = row["peak_memory_mib"] / base["peak_memory_mib"]
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / (bf16 if row["dtype"] == "bf16" else fp32)
        padded = by_label.get(config_label(row["recipe"], False, row["reference"], row["dtype"]), {})
        if row["packing"] and "seconds_per_step" in padded:
            row["speedup_vs_padded"] = padded["seconds_per_step"] / row["seconds_per_step"]
    print(f"matmul peak: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s; {torch.get_num_threads()} threads")
    print(f"{'configuration':<32} {'batches':<9} {'s/step':>7} {'x time':>7} {'peak MiB':>9} {'GFLOP/s':>8} {'% peak':>7}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['label']:<32} skipped: {row['skipped']}")
            continue
        shape = "/".join(str(v) for v in row["batch_sizes"].values())
        print(f"{row['label']:<32} {shape:<9} {row['seconds_per_step']:7.2f} {row['time_vs_baseline']:7.2f} "
              f"{row['peak_memory_mib']:9.0f} {row['gflops_per_s']:8.1f} {100 * row['fraction_of_matmul_peak']:6.0f} %")
    return {"options": options, "matmul_gflops": {"fp32": fp32, "bf16": bf16}, "batch_size": batch_size,
            "steps": steps, "torch_threads": torch.get_num_threads(), "rows": rows, "versions": package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", default=None, help="comma list of configurations to run (default: all): "
                        + ", ".join(config_label(*c) for c in CONFIGS))
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    results = measure(args.model, args.steps, args.batch_size, args.configs.split(",") if args.configs else None)
    if args.out:
        from amendlm.report import atomic_write_json

        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
