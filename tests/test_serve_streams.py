"""``amendlm serve``: streams and how they end, against a server on a free loopback port serving tiny random
models: server-sent events equal to the whole text, a full queue (503), clients leaving mid-stream or
mid-request, and SIGTERM finishing the stream in flight.  Shared parts: ``serve_common.py``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .serve_common import (HTTP, Server, error_of, metric, openai, served_models,  # noqa: F401 (fixtures)
                           models, server, tokenizer)


def test_streaming_gives_the_same_text_then_usage_and_done(server):
    kwargs = dict(model="tiny+a", prompt="stream me", max_tokens=15, temperature=0)
    whole = server.client.completions.create(**kwargs).choices[0].text
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    chat = list(server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=5, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    with HTTP.stream("POST", server.url + "/v1/completions", json={**kwargs, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_full_queue_answers_503_with_retry_after(tokenizer, models):
    s = Server(served_models(tokenizer, models), max_queue=1)
    try:
        never = HTTP.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": ["x", "y"]})
        assert never.status_code == 400 and error_of(never)["param"] == "prompt" and "max-queue" in error_of(never)["message"]
        from amendlm.serve.engine import QueueFull

        def full(job):  # a queue with no room left, whatever the worker is doing
            raise QueueFull("1 requests are waiting (--max-queue 1)")
        s.engine.submit = full
        response = HTTP.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert error_of(response)["code"] == "queue_full" and "max-queue" in error_of(response)["message"]
        with pytest.raises(openai.APIStatusError) as refused:
            s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True)
        assert refused.value.status_code == 503
        del s.engine.submit
        s.engine._stopping = True  # as after SIGTERM
        stopping = HTTP.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert stopping.status_code == 503 and error_of(stopping)["code"] == "shutting_down"
    finally:
        s.close()


def test_a_client_leaving_mid_stream_frees_its_row_and_the_others_finish(tokenizer, models):
    # a batch of 2 starts as soon as both requests are queued (max_wait long), so they always share it
    s = Server(served_models(tokenizer, models, eos=False), max_batch_size=2, max_wait_ms=30_000)
    try:
        body = {"model": "tiny+a", "prompt": "go", "max_tokens": 240, "temperature": 0, "stream": True}

        def leave_early():
            with httpx.Client(timeout=120) as own, own.stream("POST", s.url + "/v1/completions", json=body) as response:
                next(response.iter_lines())  # one event, then hang up

        def stay():
            return [c for c in s.client.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True)]

        with ThreadPoolExecutor(2) as pool:
            left, stayed = pool.submit(leave_early), pool.submit(stay)
            left.result()
            chunks = stayed.result()
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in chunks)) > 0

        def counter(name: str) -> int:
            return int(re.search(rf"^{name} (\d+)$", HTTP.get(s.url + "/metrics").text, re.M).group(1))

        deadline = time.monotonic() + 60
        while counter("amendlm_cancelled_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counter("amendlm_cancelled_total") == 1 and counter("amendlm_batches_total") == 1
        assert 240 <= counter("amendlm_generated_tokens_total") < 2 * 240  # the row left stopped decoding
        assert s.client.completions.create(model="tiny", prompt="still alive", max_tokens=3).usage.completion_tokens == 3
    finally:
        s.close()


def test_a_non_streaming_client_leaving_cancels_its_row(tokenizer, models):
    import socket

    # each step sleeps 20 ms, so 240 tokens take >= 4.8 s: far longer than noticing the client left (<= 0.5 s + a step)
    hook = models[0].register_forward_hook(lambda *args: time.sleep(0.02))
    s = Server(served_models(tokenizer, models, eos=False), max_batch_size=1)
    try:
        body = json.dumps({"model": "tiny", "prompt": "go", "max_tokens": 240, "temperature": 0}).encode()
        host, port = s.url.removeprefix("http://").split(":")
        client = socket.create_connection((host, int(port)))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while metric(s.url, "amendlm_generated_tokens_total") < 5:  # its row is decoding
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.close()
        while metric(s.url, "amendlm_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the server did not notice the client left"
            time.sleep(0.05)
        assert metric(s.url, "amendlm_generated_tokens_total") < 240
    finally:
        hook.remove()
        s.close()


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(tmp_path, tokenizer, models):
    import queue

    model_dir = tmp_path / "tiny"
    models[0].save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    process = subprocess.Popen([sys.executable, "-m", "amendlm", "serve", "--model", str(model_dir), "--port", "0",
                                "--shutdown-timeout", "300"], stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        line, deadline = "", time.monotonic() + 300  # importing torch + transformers took 90 s on a loaded 2-core machine
        while "listening on" not in line:  # bounded: a server that never listens fails the test, never hangs it
            assert process.poll() is None, "server exited before listening"
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("server did not listen within 300 s")
        url = re.search(r"http://\S+", line).group(0)
        # greedy on this model, the prompt runs to max_tokens (no EOS): 240 steps, seconds of decoding after the signal
        body = {"model": str(model_dir), "prompt": "drain", "max_tokens": 240, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        before, after = [], []
        with HTTP.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for event in response.iter_lines():
                if not event:
                    continue
                (after if before else before).append(event)
                if len(before) == 1 and not after:
                    process.send_signal(signal.SIGTERM)
        assert len(before) == 1 and len(after) > 100  # the stream went on, well after the signal
        assert after[-1] == "data: [DONE]"
        assert json.loads(after[-2][len("data: "):])["usage"]["completion_tokens"] == 240
        assert json.loads(after[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=300) == 0
    finally:
        if process.poll() is None:
            process.kill()
