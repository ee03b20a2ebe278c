"""RAM decoding speed: proposal x aligner against the proposal's own ``generate``, batch 1 and batch B.

Runs ``benchmarks/bench_decode.py`` (its :func:`measure`) and renders its table with the targets
the benchmark records (step ratio, first-token ratio, batch speed-up).  The aligner is the one
``experiments/ram_xsum.py`` trains (``runs/ram/aligner/aligner``, a LoRA copy of the proposal).

    python experiments/bench_decode.py             # batch 8, 32 new tokens, 128-token prompts, as published
                                                   # (~1.5 min on one thread from the recorded rates; needs runs/ram/aligner/aligner)
    python experiments/bench_decode.py --quick --results-dir /tmp/r   # 2-block aligner, batch 2, 3 tokens (~35 s)

A measurement already in ``results/bench_decode.json`` (the benchmark's CLI) or
``results/bench_decode/bench_decode.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import load_benchmark, measured, measurement_notes, verdict
from common import Experiment, markdown_table

RAM_ALIGNER = "runs/ram/aligner/aligner"  # experiments/ram_xsum.py's aligner (relative to the repository)


def legacy_options(data: dict) -> dict:
    """The options a file written before ``options`` were recorded states of itself (its CLI ``args``)."""
    return {k: v for k, v in data.get("args", {}).items() if k != "out"}


def measure(bench, opts: dict) -> dict:
    aligner = opts["aligner"]
    if aligner and ("/" in aligner or aligner.startswith(".")) and not Path(aligner).exists():
        raise FileNotFoundError(f"aligner {aligner} not found: train it with `python experiments/ram_xsum.py` "
                                "(or pass --aligner MODEL, e.g. the proposal itself: same size, same speed)")
    return bench.measure(opts["proposal"], aligner, opts["aligner_layers"], opts["mode"], opts["batch"],
                         opts["prompt_tokens"], opts["new_tokens"])


def two_batch_verdict(values: dict[str, float], target: float) -> str:
    """One target, measured at each batch size: ``met``, ``missed`` or ``met at batch 1, missed at 8``."""
    said = {size: verdict(v, target, False) for size, v in values.items()}
    if len(set(said.values())) == 1:
        return next(iter(said.values()))
    return ", ".join(f"{v} at {'batch ' if i == 0 else ''}{size}" for i, (size, v) in enumerate(said.items()))


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--proposal", default="smollm2-135m-instruct", help="Proposal model.")
        parser.add_argument("--aligner", default=RAM_ALIGNER, help="Aligner model; '' = the proposal's first --aligner-layers blocks.")
        parser.add_argument("--aligner-layers", type=int, default=6)
        parser.add_argument("--mode", default="par-kl", help="RAM decoding mode.")
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--prompt-tokens", type=int, default=128)
        parser.add_argument("--new-tokens", type=int, default=32)

    exp, args = Experiment.start("bench_decode", "RAM decoding speed: proposal x aligner vs the proposal's generate", argv, options)
    opts = {"proposal": args.proposal, "aligner": args.aligner or None, "aligner_layers": args.aligner_layers,
            "mode": args.mode, "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    if args.quick:
        opts.update(aligner=None, aligner_layers=2, batch=2, prompt_tokens=16, new_tokens=3)
    bench = load_benchmark("bench_decode")
    data, path, unrecorded = measured(exp, "bench_decode", opts, lambda: measure(bench, opts), legacy_options)

    batches, targets = data["batches"], data["targets"]
    sizes = sorted(batches, key=int)
    big = sizes[-1]

    def per_batch(key, digits):
        return [f"{batches[s][key]:.{digits}f}" for s in sizes]

    rows = [["proposal `generate`, tokens/s", *per_batch("proposal_generate_tokens_per_s", 1), "-"],
            [f"RAM (`{opts['mode']}`), tokens/s", *per_batch("ram_tokens_per_s", 1), "-"],
            ["RAM step ÷ (proposal step + aligner step)", *per_batch("step_ratio", 2),
             f"≤ {targets['step_ratio']:g}: " + two_batch_verdict({s: batches[s]["step_ratio"] for s in sizes}, targets["step_ratio"])],
            ["RAM first-token latency ÷ proposal's", *per_batch("first_token_ratio", 2),
             f"≤ {targets['first_token_ratio']:g}: "
             + two_batch_verdict({s: batches[s]["first_token_ratio"] for s in sizes}, targets["first_token_ratio"])]]
    if "batch_speedup" in data:
        blank = [""] * (len(sizes) - 1)
        rows.append([f"RAM batch {big} ÷ batch 1 throughput", *blank, f"{data['batch_speedup']:.2f}x",
                     f"≥ {targets['batch_speedup']:g}x: {verdict(data['batch_speedup'], targets['batch_speedup'], True)}"])
        rows.append([f"RAM batch {big} ÷ a batch-1 uncached loop like the public code's", *blank,
                     f"{data['batch_speedup_vs_public_loop']:.1f}x", "-"])
    markdown = markdown_table(["", *[f"batch {s}" for s in sizes], "target"], rows, "l" + "r" * len(sizes) + "l")

    used = data.get("options") or data.get("args", {})
    aligner = (f"`{used['aligner']}`" if used.get("aligner")
               else f"the proposal's first {used.get('aligner_layers')} blocks")
    notes = (measurement_notes(data, path, exp, unrecorded, data.get("torch_threads"))
             + f"  Proposal `{used.get('proposal')}`, aligner {aligner}; fp32 decoding, every row generates exactly "
             f"{used.get('new_tokens')} tokens (EOS ignored) after prompts cut to {used.get('prompt_tokens')} document tokens.  "
             "Per-step times (median of cached single-token steps), s: "
             + "; ".join(f"batch {s}: proposal {batches[s]['proposal_step_s']:.3f}, aligner {batches[s]['aligner_step_s']:.3f}, "
                         f"RAM {batches[s]['ram_step_s']:.3f}" for s in sizes) + ".")
    summary = {"options": opts, "unrecorded_options": unrecorded, "targets": targets, "batches": batches,
               "batch_speedup": data.get("batch_speedup"), "batch_speedup_vs_public_loop": data.get("batch_speedup_vs_public_loop")}
    headline = [(f"RAM (`{opts['mode']}`) decoding step ÷ (proposal step + aligner step), batch {' / '.join(sizes)}",
                 " / ".join(f"{batches[s]['step_ratio']:.2f}" for s in sizes) + f" (target ≤ {targets['step_ratio']:g})")]
    exp.finish(summary, markdown, notes=notes, sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
