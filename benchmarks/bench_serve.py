"""Serving load: concurrent clients against ``amendlm serve`` on loopback, batching vs ``--max-batch-size 1``.

One run, same machine, same prompts, same greedy completions (so both settings do the same work):

1. the aligner is the proposal's first ``--aligner-layers`` blocks (the only same-vocabulary small
   aligner offline), saved once to a temporary directory;
2. for each ``--max-batch-size`` in (``--batch``, 1): start ``python -m amendlm serve`` (a separate
   process, port 0 on 127.0.0.1) serving the model alone and ``model+aligner``; for each of the two,
   ``--clients`` concurrent clients each send ``--requests-per-client`` streamed chat completions
   (XSum test documents cut to ``--prompt-tokens``, ``max_tokens`` ``--max-tokens``, temperature 0),
   after one warm-up request; then SIGTERM the server and record its exit code.

Reported per scenario: requests, failures (non-200, error event, no ``[DONE]``, timeout), wall
seconds, requests/s, completion tokens/s (``usage``), latency and time to first token p50 / p95 /
p99, and the mean batch size the server ran (``/metrics``); per target, batched ÷ batch-1 tokens/s.
Targets: 0 failures, batching >= 2x.  Bounded: ``clients x requests_per_client`` requests per
scenario, each with a ``--request-timeout``.

Usage: ``python benchmarks/bench_serve.py [--clients 64] [--batch 16] [--out results/bench_serve.json]``;
from Python, :func:`measure` takes the same options and returns the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from amendlm.report import atomic_write_json, package_versions

TARGETS = {"failures": 0, "batching_speedup": 2.0}


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def save_aligner(model: str, layers: int, directory: str) -> None:
    """The proposal's first ``layers`` blocks (+ final norm and head), saved as a model directory."""
    from amendlm.modeling import load_model
    from amendlm.ram.train import truncate_to_layers

    aligner, tokenizer = load_model(model)
    truncate_to_layers(aligner, layers)
    aligner.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prompts_of(model: str, n: int, prompt_tokens: int) -> list[str]:
    """``n`` user messages: XSum test documents cut to ``prompt_tokens`` tokens, with the task's instruction."""
    from amendlm.modeling import load_tokenizer
    from amendlm.ram.data import TaskConfig, load_task

    records = load_task(TaskConfig(split="test", max_document_tokens=prompt_tokens, limit=n), load_tokenizer(model))
    return [r.prompt for r in records]


class ServerProcess:
    """``python -m amendlm serve ...`` in a child process; :attr:`url` once it listens."""

    def __init__(self, args: list[str], start_timeout: float = 300.0):
        self.process = subprocess.Popen([sys.executable, "-m", "amendlm", "serve", "--port", "0", *args],
                                        stderr=subprocess.PIPE, text=True)
        deadline, line = time.monotonic() + start_timeout, ""
        while "listening on" not in line:
            line = self.process.stderr.readline()
            if (not line and self.process.poll() is not None) or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"amendlm serve did not start: {line.strip() or 'exited'}")
        self.url = re.search(r"http://\S+", line).group(0)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (the server drains what is in flight)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def server_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: float(value) for name, value in re.findall(r"^(amendlm_\w+) ([0-9.e+-]+)$", text, re.M)}


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat completion: latency, time to first token, completion tokens, or the failure."""
    began = time.perf_counter()
    first, tokens, done = None, None, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    return {"ok": False, "error": chunk["error"]["message"]}
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - began
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, OSError, ValueError) as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    if not done or tokens is None:
        return {"ok": False, "error": "stream ended without usage and [DONE]"}
    latency = time.perf_counter() - began
    return {"ok": True, "latency": latency, "first_token": first if first is not None else latency, "tokens": tokens}


async def load(url: str, model: str, prompts: list[str], clients: int, requests_per_client: int, max_tokens: int,
               request_timeout: float) -> tuple[list[dict], float]:
    """``clients`` concurrent loops of ``requests_per_client`` requests; returns (results, wall seconds)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        def body(i: int) -> dict:
            return {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}

        async def client_loop(c: int) -> list[dict]:
            return [await one_request(client, url, body(c * requests_per_client + r)) for r in range(requests_per_client)]

        began = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c) for c in range(clients)))
        return [r for results in per_client for r in results], time.perf_counter() - began


def scenario_row(results: list[dict], seconds: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    latencies, firsts = [r["latency"] for r in ok], [r["first_token"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    batches = after.get("amendlm_batches_total", 0) - before.get("amendlm_batches_total", 0)
    rows = after.get("amendlm_batch_rows_total", 0) - before.get("amendlm_batch_rows_total", 0)
    row = {"requests": len(results), "failures": len(results) - len(ok), "seconds": seconds,
           "requests_per_s": len(ok) / seconds, "tokens_per_s": tokens / seconds, "completion_tokens": tokens,
           "mean_batch_size": rows / batches if batches else None,
           "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}
    for q in (50, 95, 99):
        row[f"latency_p{q}_s"] = percentile(latencies, q)
        row[f"first_token_p{q}_s"] = percentile(firsts, q)
    return row


def measure(model: str = "smollm2-135m-instruct", aligner_layers: int = 6, mode: str = "par-kl", clients: int = 64,
            requests_per_client: int = 1, max_tokens: int = 16, prompt_tokens: int = 32, batch: int = 16,
            max_wait_ms: float = 50.0, request_timeout: float = 600.0, dtype: str = "fp32") -> dict:
    """Run the benchmark (options as the CLI's) and return the results (they record their ``options``)."""
    options = {"model": model, "aligner_layers": aligner_layers, "mode": mode, "clients": clients,
               "requests_per_client": requests_per_client, "max_tokens": max_tokens, "prompt_tokens": prompt_tokens,
               "batch": batch, "max_wait_ms": max_wait_ms, "request_timeout": request_timeout, "dtype": dtype}
    prompts = prompts_of(model, clients * requests_per_client, prompt_tokens)
    results = {"options": options, "versions": package_versions(), "cpu_count": os.cpu_count(), "scenarios": {}, "server_exit_codes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_serve_aligner.") as aligner_dir:
        save_aligner(model, aligner_layers, aligner_dir)
        for size in (batch, 1):
            server = ServerProcess(["--model", model, "--name", "m", "--aligner", f"a{aligner_layers}={aligner_dir}",
                                    "--mode", mode, "--max-batch-size", str(size), "--max-wait-ms", str(max_wait_ms),
                                    "--max-queue", str(4 * clients), "--dtype", dtype, "--shutdown-timeout", "60"])
            try:
                for target in ("m", f"m+a{aligner_layers}"):
                    asyncio.run(load(server.url, target, prompts, 1, 1, max_tokens, request_timeout))  # warm-up, not counted
                    before = server_counters(server.url)
                    out, seconds = asyncio.run(load(server.url, target, prompts, clients, requests_per_client, max_tokens,
                                                    request_timeout))
                    row = scenario_row(out, seconds, before, server_counters(server.url))
                    key = f"{'alone' if target == 'm' else 'aligner'}/batch{size}"
                    results["scenarios"][key] = {"target": "model alone" if target == "m" else f"model + aligner ({mode})",
                                                 "max_batch_size": size, **row}
                    print(f"{key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items() if k != "errors"), flush=True)
            finally:
                results["server_exit_codes"][str(size)] = server.stop()
    scenarios = results["scenarios"]
    results["batching_speedup"] = {target: scenarios[f"{target}/batch{batch}"]["tokens_per_s"] / scenarios[f"{target}/batch1"]["tokens_per_s"]
                                   for target in ("alone", "aligner") if scenarios[f"{target}/batch1"]["tokens_per_s"] > 0}
    results["failures"] = sum(s["failures"] for s in scenarios.values())
    results["targets"] = TARGETS
    print({"batching_speedup": results["batching_speedup"], "failures": results["failures"],
           "server_exit_codes": results["server_exit_codes"]}, flush=True)
    return results


def main() -> None:
    # a SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server child is stopped and the aligner removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--aligner-layers", type=int, default=6)
    parser.add_argument("--mode", default="par-kl")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batched server")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = measure(args.model, args.aligner_layers, args.mode, args.clients, args.requests_per_client, args.max_tokens,
                      args.prompt_tokens, args.batch, args.max_wait_ms, args.request_timeout, args.dtype)
    if args.out:
        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
