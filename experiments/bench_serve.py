"""Serving load: ``amendlm serve`` under concurrent clients, batching vs ``--max-batch-size 1``.

Runs ``benchmarks/bench_serve.py`` (its :func:`measure`: the server in a child process on loopback,
streamed chat completions from concurrent clients) and renders its table, the batching speed-up
and a figure of throughput and latency.

    python experiments/bench_serve.py              # 64 clients, 1 request each, 16 tokens, batch 16 vs 1
                                                   # (~6 min on 2 idle cores: 4 scenarios + 2 server starts)
    python experiments/bench_serve.py --quick --results-dir /tmp/r   # 4 clients, 4 tokens, 2-block aligner

A measurement already in ``results/bench_serve.json`` (the benchmark's CLI) or
``results/bench_serve/bench_serve.json`` with the same options is reused, not re-measured.
"""

from __future__ import annotations

import sys

from bench_common import fmt, load_benchmark, measured, verdict
from common import Experiment, markdown_table

from amendlm.report import atomic_save_figure


def figure(path, scenarios: dict) -> None:
    """Tokens/s per scenario (left) and latency / time-to-first-token percentiles (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(scenarios)
    labels = [f"{scenarios[k]['target']}\nbatch {scenarios[k]['max_batch_size']}" for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(range(len(keys)), [scenarios[k]["tokens_per_s"] for k in keys], color=["C0", "C1", "C0", "C1"][: len(keys)])
    left.set_xticks(range(len(keys)), labels, fontsize=8)
    left.set_ylabel("completion tokens / s")
    left.set_title("throughput")
    width = 0.13
    for j, (metric, name) in enumerate([("latency", "latency"), ("first_token", "first token")]):
        for i, q in enumerate((50, 95, 99)):
            offset = (j * 3 + i - 2.5) * width
            right.bar([x + offset for x in range(len(keys))], [scenarios[k][f"{metric}_p{q}_s"] or 0 for k in keys], width,
                      label=f"{name} p{q}", color=f"C{j * 3 + i + 2}")
    right.set_xticks(range(len(keys)), labels, fontsize=8)
    right.set_ylabel("seconds")
    right.set_title("latency and time to first token")
    right.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--model", default="smollm2-135m-instruct", help="Model served (the proposal).")
        parser.add_argument("--aligner-layers", type=int, default=6, help="Aligner = the model's first K blocks.")
        parser.add_argument("--mode", default="par-kl", help="RAM mode of the model+aligner requests.")
        parser.add_argument("--clients", type=int, default=64)
        parser.add_argument("--requests-per-client", type=int, default=1)
        parser.add_argument("--max-tokens", type=int, default=16)
        parser.add_argument("--prompt-tokens", type=int, default=32)
        parser.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server.")

    exp, args = Experiment.start("bench_serve", "Serving load: concurrent clients, batching vs one request at a time", argv, options)
    opts = {"model": args.model, "aligner_layers": args.aligner_layers, "mode": args.mode, "clients": args.clients,
            "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
            "batch": args.batch, "max_wait_ms": 50.0, "request_timeout": 600.0, "dtype": "fp32"}
    if args.quick:
        opts.update(aligner_layers=2, clients=4, requests_per_client=1, max_tokens=4, prompt_tokens=16, batch=4)
    bench = load_benchmark("bench_serve")
    data, path, unrecorded = measured(exp, "bench_serve", opts, lambda: bench.measure(**opts), lambda d: {})

    scenarios, targets = data["scenarios"], data["targets"]
    rows = []
    for s in scenarios.values():
        rows.append([s["target"], s["max_batch_size"], fmt(s["mean_batch_size"], 1), s["requests"], s["failures"],
                     fmt(s["requests_per_s"], 2), fmt(s["tokens_per_s"], 1),
                     " / ".join(fmt(s[f"latency_p{q}_s"], 2) for q in (50, 95, 99)),
                     " / ".join(fmt(s[f"first_token_p{q}_s"], 2) for q in (50, 95, 99))])
    markdown = markdown_table(["served", "--max-batch-size", "mean batch run", "requests", "failures", "requests/s",
                               "tokens/s", "latency p50 / p95 / p99, s", "first token p50 / p95 / p99, s"], rows, "lrrrrrrrr")
    speedups = data["batching_speedup"]
    markdown += "\n\n" + markdown_table(
        ["", "measured", "target"],
        [*[[f"tokens/s, batch {opts['batch']} ÷ batch 1, {'model alone' if t == 'alone' else 'model + aligner'}",
            f"{v:.2f}x", f"≥ {targets['batching_speedup']:g}x: {verdict(v, targets['batching_speedup'], True)}"]
           for t, v in speedups.items()],
         ["failures, all scenarios", data["failures"], f"{targets['failures']}: {verdict(-data['failures'], -targets['failures'], True)}"],
         ["server exit code after SIGTERM, per --max-batch-size", ", ".join(f"{k}: {v}" for k, v in data["server_exit_codes"].items()), "0"]],
        "lrl")
    png = exp.results / "bench_serve.png"
    figure(png, scenarios)
    origin = exp.origin(data, path)
    notes = (f"Measured {origin['date']}; machine: {origin['machine']}.  `amendlm serve` ran in its own process on "
             f"127.0.0.1, the clients (asyncio + httpx, streamed chat completions, temperature 0, max_tokens "
             f"{opts['max_tokens']}, XSum test documents cut to {opts['prompt_tokens']} tokens) in the benchmark's; "
             f"{opts['clients']} clients sent {opts['requests_per_client']} request(s) each per scenario, all at once, after one "
             "warm-up request.  The aligner is the model's first "
             f"{opts['aligner_layers']} blocks (RAM `{opts['mode']}`).  Latency is from sending the request to `[DONE]`; time "
             "to first token to the first non-empty content chunk; tokens/s counts `usage.completion_tokens` over the "
             "scenario's wall time.  Requests that arrive while a batch runs wait for the next batch (no joining "
             "mid-batch), which is why time to first token grows with the queue.")
    summary = {"options": opts, "unrecorded_options": unrecorded, "targets": targets, "scenarios": scenarios,
               "batching_speedup": speedups, "failures": data["failures"], "server_exit_codes": data["server_exit_codes"]}
    headline = [(f"Serving {opts['clients']} concurrent clients (loopback): tokens/s with batching (≤ {opts['batch']}) ÷ one "
                 "at a time, model alone / + aligner; failures",
                 " / ".join(f"{speedups[t]:.2f}x" for t in ("alone", "aligner") if t in speedups)
                 + f" (target ≥ {targets['batching_speedup']:g}x); {data['failures']} failures")]
    exp.finish(summary, markdown, notes=notes, pngs=[png], sources=[path], headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
