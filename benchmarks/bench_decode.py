"""RAM decoding speed: proposal x aligner vs the proposal's own ``generate``, batch 1 and batch B.

One run measures, side by side on the same machine and prompts (XSum test documents cut to
``--prompt-tokens``), every row generating exactly ``--new-tokens`` tokens (EOS ignored):

* ``proposal generate``: transformers' ``generate`` of the proposal alone (greedy, KV cache);
* ``ram``: :func:`amendlm.ram.generate.generate` in ``--mode`` (both models KV-cached);
* ``public-style loop`` (batch 1 only): the proposal's ``generate`` with a logits processor that
  reruns the aligner on the whole sequence without a cache each step, one prompt at a time;
* each model alone: the median prefill of the prompts (KV cache kept, last position's logits) and
  the median cached single-token step, to compare with RAM's first token and RAM's step.

The aligner timed is ``--aligner`` when given (a trained one), else the small aligner of
``experiments/ram_xsum.py`` built untrained: the proposal's first ``--aligner-layers`` (8) decoder
blocks with its embeddings, final norm and tied head.  Speed does not depend on weight values, so
the cut model times what the trained one costs; the result records which was timed.

Reported per batch size: tokens/s; first-token latency (prefill + first pick, median of
``--repeats`` runs) of RAM over the proposal's ``generate``, beside its floor ``1 + aligner prefill
/ proposal prefill`` (RAM cannot show its first token before both models have read the prompt); the
median RAM step (between streamed tokens) over the median proposal step + aligner step (the mean
step too); and RAM's batch-B over batch-1 throughput.  Targets: step ratio <= 1.15, first-token
ratio <= 1.2, batch-B throughput >= 4 x batch 1.

Usage: ``python benchmarks/bench_decode.py [--aligner PATH] [--aligner-layers 8] [--batch 8] [--out results/bench_decode.json]``;
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
METHOD = 2
"""What the measurement is: 2 = medians of repeated first tokens and of RAM's streamed steps, per-model
prefill times and the first-token floor (1: one first token each, the mean RAM step)."""


def prompts_of(tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    records = load_task(TaskConfig(split="test", max_document_tokens=prompt_tokens, limit=n), tokenizer)
    return [encode_prompt(tokenizer, r.prompt) for r in records]


def median_seconds(run, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``run()``."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.inference_mode()
def model_seconds(model, vocab: int, prompts, repeats: int, steps: int = 8) -> tuple[float, float]:
    """``(prefill, step)`` median seconds of one model alone: the prompts' prefill (left-padded batch, KV
    cache kept, last position's logits) over ``repeats`` runs, and one cached single-token step over
    ``steps`` steps after it."""
    runner = CachedLM(model, vocab)
    ids, mask = left_pad(prompts, 0)
    prefill = median_seconds(lambda: runner.prefill(ids, mask), repeats)
    logits = runner.prefill(ids, mask)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        logits = runner.step(logits.argmax(-1))
        times.append(time.perf_counter() - began)
    return prefill, statistics.median(times)


@torch.inference_mode()
def hf_generate(model, prompts, new_tokens: int, pad: int, repeats: int, processor=None) -> tuple[float, float]:
    """(seconds for ``new_tokens``, median seconds for 1 token over ``repeats`` runs) of ``model.generate``
    on one left-padded batch."""
    ids, mask = left_pad(prompts, pad)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad)

    def run(n):
        model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n,
                       logits_processor=[processor()] if processor else None)

    return median_seconds(lambda: run(new_tokens), 1), median_seconds(lambda: run(1), repeats)


class UncachedAligner:
    """The public code's pattern: at each step the aligner reruns the whole sequence (batch 1, no cache)."""

    def __init__(self, aligner, vocab: int, decode: DecodeConfig):
        self.aligner, self.vocab, self.decode = aligner, vocab, decode

    def __call__(self, input_ids, scores):
        aligner_logits = self.aligner(input_ids).logits[:, -1, : self.vocab]
        out = torch.full_like(scores, float("-inf"))
        out[:, : self.vocab] = apply_rule(scores[:, : self.vocab], aligner_logits, self.decode)
        return out


def ram_run(proposal, aligner, prompts, decode, new_tokens, vocab, pad) -> tuple[GenerationStats, list[float]]:
    """RAM decoding of one batch of all ``prompts``: its stats and the seconds between streamed steps."""
    stats, stamps = GenerationStats(), []
    config = GenerateConfig(max_new_tokens=new_tokens, greedy=True, batch_size=len(prompts))
    generate(proposal, aligner, prompts, decode, config, vocab_size=vocab, pad_token_id=pad, eos_token_ids=[],
             stats=stats, on_step=lambda *_: stamps.append(time.perf_counter()))
    return stats, [b - a for a, b in zip(stamps, stamps[1:])]


def parameters(model) -> int:
    """Distinct parameters of ``model`` (a tied head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_aligner(proposal_name: str, aligner_name: str | None, aligner_layers: int):
    """``(aligner, what was timed)``: ``aligner_name`` loaded, or the proposal cut to ``aligner_layers`` blocks."""
    if aligner_name:
        return load_model(aligner_name)[0], aligner_name
    aligner, _ = load_model(proposal_name)
    truncate_to_layers(aligner, aligner_layers)
    return aligner, (f"the proposal's first {aligner_layers} decoder blocks (+ embeddings, final norm, tied head), "
                     "untrained")


def measure(proposal_name: str = "smollm2-135m-instruct", aligner_name: str | None = None, aligner_layers: int = 8,
            mode: str = "par-kl", batch: int = 8, prompt_tokens: int = 128, new_tokens: int = 32,
            repeats: int = 3) -> dict:
    """Run the benchmark (options as the CLI's) and return the results (they record their ``options``).

    Raises:
        ValueError: ``new_tokens`` < 2 or ``repeats`` < 1.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (a RAM step is timed after the first token), got {new_tokens}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    options = {"proposal": proposal_name, "aligner": aligner_name, "aligner_layers": aligner_layers, "mode": mode,
               "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
               "method": METHOD}
    proposal, tokenizer = load_model(proposal_name)
    aligner, timed = load_aligner(proposal_name, aligner_name, aligner_layers)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    decode = DecodeConfig(mode=mode)
    prompts = prompts_of(tokenizer, batch, prompt_tokens)
    results = {"options": options, "torch_threads": torch.get_num_threads(), "versions": package_versions(),
               "aligner_timed": timed,
               "layers": {"proposal": proposal.config.num_hidden_layers, "aligner": aligner.config.num_hidden_layers},
               "parameters": {"proposal": parameters(proposal), "aligner": parameters(aligner)}, "batches": {},
               "matmul_peak_gflops": {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}}
    print(f"aligner timed: {timed}; matmul peak GFLOP/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in results["matmul_peak_gflops"].items()), flush=True)
    ram_run(proposal, aligner, prompts[:1], decode, 2, vocab, pad)  # warm-up
    hf_generate(proposal, prompts[:1], 2, pad, 1)
    for size in sorted({1, batch}):
        chunk = prompts[:size]
        generate_s, generate_first = hf_generate(proposal, chunk, new_tokens, pad, repeats)
        stats, ram_steps = ram_run(proposal, aligner, chunk, decode, new_tokens, vocab, pad)
        ram_first = statistics.median(ram_run(proposal, aligner, chunk, decode, 1, vocab, pad)[0].first_token_seconds
                                      for _ in range(repeats))
        proposal_prefill, proposal_step = model_seconds(proposal, vocab, chunk, repeats)
        aligner_prefill, aligner_step = model_seconds(aligner, vocab, chunk, repeats)
        ram_step, ram_step_mean = statistics.median(ram_steps), (stats.seconds - stats.first_token_seconds) / (new_tokens - 1)
        row = {
            "proposal_generate_tokens_per_s": size * new_tokens / generate_s,
            "proposal_generate_first_token_s": generate_first,
            "ram_tokens_per_s": size * new_tokens / stats.seconds,
            "ram_first_token_s": ram_first,
            "proposal_prefill_s": proposal_prefill, "aligner_prefill_s": aligner_prefill,
            "ram_first_token_beyond_prefills_s": ram_first - proposal_prefill - aligner_prefill,
            "proposal_step_s": proposal_step, "aligner_step_s": aligner_step,
            "ram_step_s": ram_step, "ram_step_mean_s": ram_step_mean,
            "step_ratio": ram_step / (proposal_step + aligner_step),
            "step_ratio_mean": ram_step_mean / (proposal_step + aligner_step),
            "first_token_ratio": ram_first / generate_first,
            "first_token_ratio_floor": 1 + aligner_prefill / proposal_prefill,
        }
        if size == 1:
            loop_s, _ = hf_generate(proposal, chunk, new_tokens, pad, 1,
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
    parser.add_argument("--aligner", default=None,
                        help="a trained aligner (model or directory); default: the proposal's first --aligner-layers "
                             "blocks, untrained (the same cost)")
    parser.add_argument("--aligner-layers", type=int, default=8)
    parser.add_argument("--mode", default="par-kl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs whose median gives each first-token and prefill time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = measure(args.proposal, args.aligner, args.aligner_layers, args.mode, args.batch, args.prompt_tokens,
                      args.new_tokens, args.repeats)
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
