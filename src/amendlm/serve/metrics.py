"""``GET /metrics``: request counts, queue length, running rows, batches and tokens/s in Prometheus' text format."""

from __future__ import annotations

import collections
import threading

from amendlm.serve.engine import Engine

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class RequestCounter:
    """HTTP responses by path (known routes; any other is ``other``) and status code."""

    def __init__(self):
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        with self.lock:
            self.counts[(path if path in KNOWN_PATHS else "other", status)] += 1

    class Middleware:
        """Pure ASGI middleware (streaming and disconnects pass through untouched) counting each response's status."""

        def __init__(self, app, counter: "RequestCounter"):
            self.app, self.counter = app, counter

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            status = {"code": 500}

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                self.counter.add(scope["path"], status["code"])


def prometheus_text(counter: RequestCounter, engine: Engine) -> str:
    """The metrics page (text exposition format 0.0.4)."""
    m = engine.metrics
    lines = ["# HELP amendlm_requests_total HTTP responses by path and status code.",
             "# TYPE amendlm_requests_total counter"]
    with counter.lock:
        for (path, code), count in sorted(counter.counts.items()):
            lines.append(f'amendlm_requests_total{{path="{path}",code="{code}"}} {count}')
    gauges = [
        ("amendlm_queue_length", "gauge", "prompts waiting for a batch", engine.queue_length()),
        ("amendlm_running_rows", "gauge", "prompts decoding in the running batch", m.running),
        ("amendlm_tokens_per_second", "gauge", f"tokens generated per second over the last {m.window:g} s", m.tokens_per_second()),
        ("amendlm_generated_tokens_total", "counter", "tokens generated (EOS excluded)", m.generated_tokens),
        ("amendlm_batches_total", "counter", "batches decoded", m.batches),
        ("amendlm_batch_rows_total", "counter", "prompts decoded in batches (divide by batches for the mean batch size)", m.batch_rows),
        ("amendlm_cancelled_total", "counter", "prompts whose client left before they ended", m.cancelled),
        ("amendlm_max_batch_size", "gauge", "--max-batch-size", engine.max_batch_size),
    ]
    for name, kind, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}", f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"]
    return "\n".join(lines) + "\n"
