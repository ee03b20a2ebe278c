"""RAM decoding speed: proposal x aligner against the proposal's own ``generate``, batch 1 and batch B.

Runs ``benchmarks/bench_decode.py`` (its :func:`measure`) and renders its table with the targets
the benchmark records (step ratio, first-token ratio beside its floor, batch speed-up).  The aligner
timed is by default the small aligner of ``experiments/ram_xsum.py`` built untrained, the proposal's
first ``--aligner-layers`` (8) blocks: speed does not depend on weight values, so no training is
needed; ``--aligner runs/ram/small8/aligner`` times the trained one (the same cost).

    python experiments/bench_decode.py             # batch 8, 32 new tokens, 128-token prompts, as published
                                                   # (a few minutes on a quiet 2-core CPU: every first token 3 times)
    python experiments/bench_decode.py --quick --results-dir /tmp/r   # batch 2, 16-token prompts, 3 tokens

A measurement already in ``results/bench_decode.json`` (the benchmark's CLI) or
``results/bench_decode/bench_decode.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import load_benchmark, measured, measurement_notes, verdict
from common import Experiment, markdown_table

def legacy_options(data: dict) -> dict:
    """The options a file written before ``options`` were recorded states of itself (its CLI ``args``)."""
    return {k: v for k, v in data.get("args", {}).items() if k != "out"}


def measure(bench, opts: dict) -> dict:
    aligner = opts["aligner"]
    if aligner and ("/" in aligner or aligner.startswith(".")) and not Path(aligner).exists():
        raise FileNotFoundError(f"aligner {aligner} not found: train it with `python experiments/ram_xsum.py`, "
                                "or leave --aligner out to time the proposal's first --aligner-layers blocks (the same cost)")
    return bench.measure(opts["proposal"], aligner, opts["aligner_layers"], opts["mode"], opts["batch"],
                         opts["prompt_tokens"], opts["new_tokens"], opts["repeats"])


def two_batch_verdict(values: dict[str, float], target: float) -> str:
    """One target, measured at each batch size: ``met``, ``missed`` or ``met at batch 1, missed at 8``."""
    said = {size: verdict(v, target, False) for size, v in values.items()}
    if len(set(said.values())) == 1:
        return next(iter(said.values()))
    return ", ".join(f"{v} at {'batch ' if i == 0 else ''}{size}" for i, (size, v) in enumerate(said.items()))


def floor_note(floors: dict[str, float], target: float) -> str:
    """Whether the first-token target lies above its floor at each batch size (reachable) or below (not)."""
    below = [size for size, floor in floors.items() if floor > target]
    if not below:
        return f"under {target:g}: the target is reachable"
    return f"over {target:g} at batch {', '.join(below)}: the target is out of reach there"


def aligner_label(data: dict) -> str:
    """The aligner a measurement timed, for the notes: its path in backticks, or what was cut."""
    timed, path = data["aligner_timed"], data["options"].get("aligner")
    return f"`{timed}`" if path and timed == path else timed


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--proposal", default="smollm2-135m-instruct", help="Proposal model.")
        parser.add_argument("--aligner", default="",
                            help="A trained aligner (e.g. runs/ram/small8/aligner); default '': the proposal's first "
                                 "--aligner-layers blocks, untrained (the same cost).")
        parser.add_argument("--aligner-layers", type=int, default=8, help="K of the default aligner.")
        parser.add_argument("--mode", default="par-kl", help="RAM decoding mode.")
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--prompt-tokens", type=int, default=128)
        parser.add_argument("--new-tokens", type=int, default=32)
        parser.add_argument("--repeats", type=int, default=3, help="Runs whose median gives each first-token and prefill time.")

    exp, args = Experiment.start("bench_decode", "RAM decoding speed: proposal x aligner vs the proposal's generate", argv, options)
    opts = {"proposal": args.proposal, "aligner": args.aligner or None, "aligner_layers": args.aligner_layers,
            "mode": args.mode, "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats}
    if args.quick:
        opts.update(aligner=None, batch=2, prompt_tokens=16, new_tokens=3, repeats=1)
    bench = load_benchmark("bench_decode")
    opts["method"] = bench.METHOD  # a file measured another way is measured again
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
             + two_batch_verdict({s: batches[s]["first_token_ratio"] for s in sizes}, targets["first_token_ratio"])],
            ["its floor: 1 + aligner prefill ÷ proposal prefill", *per_batch("first_token_ratio_floor", 2),
             floor_note({s: batches[s]["first_token_ratio_floor"] for s in sizes}, targets["first_token_ratio"])]]
    if "batch_speedup" in data:
        blank = [""] * (len(sizes) - 1)
        rows.append([f"RAM batch {big} ÷ batch 1 throughput", *blank, f"{data['batch_speedup']:.2f}x",
                     f"≥ {targets['batch_speedup']:g}x: {verdict(data['batch_speedup'], targets['batch_speedup'], True)}"])
        rows.append([f"RAM batch {big} ÷ a batch-1 uncached loop like the public code's", *blank,
                     f"{data['batch_speedup_vs_public_loop']:.1f}x", "-"])
    markdown = markdown_table(["", *[f"batch {s}" for s in sizes], "target"], rows, "l" + "r" * len(sizes) + "l")

    used = data["options"]
    layers, params = data["layers"], data["parameters"]
    notes = (measurement_notes(data, path, exp, unrecorded, data.get("torch_threads"))
             + f"  Proposal `{used['proposal']}` ({layers['proposal']} blocks, {params['proposal'] / 1e6:.1f}M parameters); "
             f"aligner timed: {aligner_label(data)} ({layers['aligner']} blocks, {params['aligner'] / 1e6:.1f}M parameters).  "
             f"fp32 decoding, every row generates exactly {used['new_tokens']} tokens (EOS ignored) after prompts cut to "
             f"{used['prompt_tokens']} document tokens; first tokens and prefills are "
             + (f"medians of {used['repeats']} runs.  " if used["repeats"] > 1 else "single runs.  ")
             + "Per-step times (medians: each model's cached single-token step, RAM's time between streamed tokens), s: "
             + "; ".join(f"batch {s}: proposal {batches[s]['proposal_step_s']:.3f}, aligner {batches[s]['aligner_step_s']:.3f}, "
                         f"RAM {batches[s]['ram_step_s']:.3f} (mean {batches[s]['ram_step_mean_s']:.3f}, ratio "
                         f"{batches[s]['step_ratio_mean']:.2f})" for s in sizes)
             + ".  Prefill, s: "
             + "; ".join(f"batch {s}: proposal {batches[s]['proposal_prefill_s']:.3f}, aligner {batches[s]['aligner_prefill_s']:.3f}, "
                         f"RAM's first token beyond both {batches[s]['ram_first_token_beyond_prefills_s']:.3f}, "
                         f"proposal `generate`'s first token {batches[s]['proposal_generate_first_token_s']:.3f}" for s in sizes)
             + ".  RAM's first token needs both models' prefill, so its ratio to the proposal's stays at or above the floor "
             "up to timing noise (the ratio and the floor come from separately timed runs).")
    summary = {"options": opts, "unrecorded_options": unrecorded, "aligner_timed": data["aligner_timed"],
               "layers": layers, "parameters": params, "targets": targets, "batches": batches,
               "batch_speedup": data.get("batch_speedup"), "batch_speedup_vs_public_loop": data.get("batch_speedup_vs_public_loop")}
    which = f"{layers['aligner']}-block aligner"
    headline = [(f"RAM (`{opts['mode']}`, {which}) decoding step ÷ (proposal step + aligner step), batch {' / '.join(sizes)}",
                 " / ".join(f"{batches[s]['step_ratio']:.2f}" for s in sizes) + f" (target ≤ {targets['step_ratio']:g})"),
                (f"RAM ({which}) first-token latency ÷ proposal `generate`'s, batch {' / '.join(sizes)}",
                 " / ".join(f"{batches[s]['first_token_ratio']:.2f}" for s in sizes)
                 + f" (target ≤ {targets['first_token_ratio']:g}; floor 1 + aligner prefill ÷ proposal prefill: "
                 + " / ".join(f"{batches[s]['first_token_ratio_floor']:.2f}" for s in sizes) + ")")]
    exp.finish(summary, markdown, notes=notes, sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
