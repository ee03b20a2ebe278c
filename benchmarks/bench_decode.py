"""RAM decoding speed: proposal x aligner vs the proposal's own ``generate``, batch 1 and batch B.

One run measures, side by side on the same machine and prompts (XSum test documents cut to
``--prompt-tokens``), every row generating exactly ``--new-tokens`` tokens (EOS ignored):

* ``proposal generate``: transformers' ``generate`` of the proposal alone (greedy, KV cache);
* ``ram``: :func:`amendlm.ram.generate.generate` in ``--mode`` (both models KV-cached);
* ``public-style loop`` (batch 1 only): the proposal's ``generate`` with a logits processor that
  reruns the aligner on the whole sequence without a cache each step, one prompt at a time;
* the cost of one cached forward step of each model alone (median), to compare with a RAM step.

Reported: tokens/s, first-token latency (prefill + first pick), the RAM step cost over
(proposal step + aligner step), RAM first-token latency over the proposal's, and the batch-B over
batch-1 throughput of RAM.  Targets: step ratio <= 1.15, first-token ratio <= 1.2,
batch-B throughput >= 4 x batch 1.

Usage: ``python benchmarks/bench_decode.py [--aligner-layers 6] [--batch 8] [--out results/bench_decode.json]``;
from Python, :func:`measure` takes the same options and returns the results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from amendlm.modeling import load_model
from amendlm.ram.data import TaskConfig, encode_prompt, load_task
from amendlm.ram.decoding import DecodeConfig, apply_rule
from amendlm.ram.generate import CachedLM, GenerateConfig, GenerationStats, generate, left_pad
from amendlm.ram.train import truncate_to_layers
from amendlm.report import atomic_write_json, package_versions

from benchlib import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)

TARGETS = {"step_ratio": 1.15, "first_token_ratio": 1.2, "batch_speedup": 4.0}


def prompts_of(tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    records = load_task(TaskConfig(split="test", max_document_tokens=prompt_tokens, limit=n), tokenizer)
    return [encode_prompt(tokenizer, r.prompt) for r in records]


@torch.inference_mode()
def step_seconds(model, vocab: int, prompts, repeats: int = 8) -> float:
    """Median seconds of one cached single-token forward step over a batch."""
    runner = CachedLM(model, vocab)
    ids, mask = left_pad(prompts, 0)
    logits = runner.prefill(ids, mask)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        logits = runner.step(logits.argmax(-1))
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def hf_generate(model, prompts, new_tokens: int, pad: int, processor=None) -> tuple[float, float]:
    """(seconds for ``new_tokens``, seconds for 1 token) of ``model.generate`` on one left-padded batch."""
    ids, mask = left_pad(prompts, pad)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad)
    timings = []
    for n in (new_tokens, 1):
        processors = [processor()] if processor else None
        began = time.perf_counter()
        model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n, logits_processor=processors)
        timings.append(time.perf_counter() - began)
    return timings[0], timings[1]


class UncachedAligner:
    """The public code's pattern: at each step the aligner reruns the whole sequence (batch 1, no cache)."""

    def __init__(self, aligner, vocab: int, decode: DecodeConfig):
        self.aligner, self.vocab, self.decode = aligner, vocab, decode

    def __call__(self, input_ids, scores):
        aligner_logits = self.aligner(input_ids).logits[:, -1, : self.vocab]
        out = torch.full_like(scores, float("-inf"))
        out[:, : self.vocab] = apply_rule(scores[:, : self.vocab], aligner_logits, self.decode)
        return out


def ram_run(proposal, aligner, prompts, decode, new_tokens, vocab, pad) -> tuple[float, float]:
    """(seconds, first-token seconds) of RAM decoding one batch of all ``prompts``."""
    stats = GenerationStats()
    config = GenerateConfig(max_new_tokens=new_tokens, greedy=True, batch_size=len(prompts))
    generate(proposal, aligner, prompts, decode, config, vocab_size=vocab, pad_token_id=pad, eos_token_ids=[], stats=stats)
    return stats.seconds, stats.first_token_seconds


def measure(proposal_name: str = "smollm2-135m-instruct", aligner_name: str | None = None, aligner_layers: int = 6,
            mode: str = "par-kl", batch: int = 8, prompt_tokens: int = 128, new_tokens: int = 32) -> dict:
    """Run the benchmark (options as the CLI's) and return the results (they record their ``options``)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (a RAM step is timed after the first token), got {new_tokens}")
    options = {"proposal": proposal_name, "aligner": aligner_name, "aligner_layers": aligner_layers, "mode": mode,
               "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    proposal, tokenizer = load_model(proposal_name)
    if aligner_name:
        aligner, _ = load_model(aligner_name)
    else:
        aligner, _ = load_model(proposal_name)
        truncate_to_layers(aligner, aligner_layers)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    decode = DecodeConfig(mode=mode)
    prompts = prompts_of(tokenizer, batch, prompt_tokens)
    results = {"options": options, "torch_threads": torch.get_num_threads(), "versions": package_versions(), "batches": {},
               "matmul_peak_gflops": {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}}
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in results["matmul_peak_gflops"].items()), flush=True)
    ram_run(proposal, aligner, prompts[:1], decode, 2, vocab, pad)  # warm-up
    for size in sorted({1, batch}):
        chunk = prompts[:size]
        generate_s, generate_first = hf_generate(proposal, chunk, new_tokens, pad)
        ram_s, ram_first = ram_run(proposal, aligner, chunk, decode, new_tokens, vocab, pad)
        proposal_step, aligner_step = step_seconds(proposal, vocab, chunk), step_seconds(aligner, vocab, chunk)
        ram_step = (ram_s - ram_first) / (new_tokens - 1)
        row = {
            "proposal_generate_tokens_per_s": size * new_tokens / generate_s,
            "proposal_generate_first_token_s": generate_first,
            "ram_tokens_per_s": size * new_tokens / ram_s,
            "ram_first_token_s": ram_first,
            "proposal_step_s": proposal_step, "aligner_step_s": aligner_step, "ram_step_s": ram_step,
            "step_ratio": ram_step / (proposal_step + aligner_step),
            "first_token_ratio": ram_first / generate_first,
        }
        if size == 1:
            loop_s, _ = hf_generate(proposal, chunk, new_tokens, pad,
                                    processor=lambda: UncachedAligner(aligner, vocab, decode))
            row["public_style_loop_tokens_per_s"] = new_tokens / loop_s
        results["batches"][str(size)] = row
        print(f"batch {size}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    one, many = results["batches"]["1"], results["batches"].get(str(batch))
    if many is not None and batch > 1:
        results["batch_speedup"] = many["ram_tokens_per_s"] / one["ram_tokens_per_s"]
        results["batch_speedup_vs_public_loop"] = many["ram_tokens_per_s"] / one["public_style_loop_tokens_per_s"]
    results["targets"] = TARGETS
    print({k: v for k, v in results.items() if k.startswith("batch_speedup")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposal", default="smollm2-135m-instruct")
    parser.add_argument("--aligner", default=None, help="aligner model; default: the proposal's first --aligner-layers blocks")
    parser.add_argument("--aligner-layers", type=int, default=6)
    parser.add_argument("--mode", default="par-kl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = measure(args.proposal, args.aligner, args.aligner_layers, args.mode, args.batch, args.prompt_tokens,
                      args.new_tokens)
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
