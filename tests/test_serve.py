"""``amendlm serve`` through the official ``openai`` client (and raw HTTP for what the client hides),
against a server on a free loopback port serving tiny random models: one proposal alone and with an aligner."""

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
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from amendlm.ram.data import encode_prompt  # noqa: E402
from amendlm.ram.decoding import DecodeConfig  # noqa: E402
from amendlm.ram.generate import GenerateConfig, generate  # noqa: E402
from amendlm.serve.models import build_served, parse_aligner_option  # noqa: E402
from amendlm.serve.rows import RowText, Sampling  # noqa: E402
from amendlm.serve.server import ServeConfig, build_app, uvicorn_server  # noqa: E402

from .conftest import make_byte_tokenizer, make_tiny_llama  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CONTEXT = 256  # make_tiny_llama's max_position_embeddings
HTTP = httpx.Client(timeout=120)  # generous: the tests may share the 2 cores with other work


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def models(tokenizer):
    return make_tiny_llama(len(tokenizer), seed=0), make_tiny_llama(len(tokenizer), seed=1)


def served_models(tokenizer, models, eos=True):
    proposal, aligner = models
    served = build_served("tiny", proposal, tokenizer, {"a": (aligner, tokenizer)}, DecodeConfig(mode="par-kl"))
    if not eos:  # rows then end only at max_tokens: long, predictable streams
        served = {key: replace(value, eos_token_ids=[]) for key, value in served.items()}
    return served


class Server:
    """uvicorn in a thread on a free loopback port (the socket is bound to port 0 first)."""

    def __init__(self, served, **options):
        config = ServeConfig(model="tiny", port=0, **options)
        self.app, self.engine = build_app(config, served=served)
        self.server = uvicorn_server(self.app, config)
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(tokenizer, models):
    s = Server(served_models(tokenizer, models), max_batch_size=8, max_wait_ms=20)
    yield s
    s.close()


def library(tokenizer, models, ids, mode, max_new_tokens):
    """What ``amendlm align generate --greedy`` decodes for the same prompt ids and pair."""
    proposal, aligner = models
    out = generate(proposal, aligner, [ids], DecodeConfig(mode=mode), GenerateConfig(max_new_tokens=max_new_tokens, greedy=True),
                   vocab_size=len(tokenizer), pad_token_id=2, eos_token_ids=[1], tokenizer=tokenizer)
    return out[0]


def test_models_lists_the_model_and_each_pair(server):
    assert sorted(m.id for m in server.client.models.list().data) == ["tiny", "tiny+a"]


@pytest.mark.parametrize("model, mode", [("tiny", "proposal"), ("tiny+a", "par"), ("tiny+a", "mds")])
def test_greedy_completion_equals_the_library_generate(server, tokenizer, models, model, mode):
    extra = {} if model == "tiny" else {"mode": mode}
    out = server.client.completions.create(model=model, prompt="hello there", max_tokens=12, temperature=0, extra_body=extra)
    expected = library(tokenizer, models, encode_prompt(tokenizer, "hello there", chat_template=False), mode, 12)
    assert out.choices[0].text == expected.text
    assert out.usage.prompt_tokens == len(encode_prompt(tokenizer, "hello there", chat_template=False))
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")


def test_greedy_chat_uses_the_chat_template_and_equals_the_library(server, tokenizer, models):
    out = server.client.chat.completions.create(model="tiny+a", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=10, temperature=0, extra_body={"mode": "par-kl"})
    ids = encode_prompt(tokenizer, "hi", chat_template=True)
    assert out.choices[0].message.content == library(tokenizer, models, ids, "par-kl", 10).text
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)


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


def test_a_list_of_prompts_gives_one_choice_each_in_order(server):
    for prompts in (["first prompt", "second", "third one"], [[0, 70, 71, 72], [0, 80], [0, 90, 91]]):
        out = server.client.completions.create(model="tiny+a", prompt=prompts, max_tokens=6, temperature=0)
        alone = [server.client.completions.create(model="tiny+a", prompt=p, max_tokens=6, temperature=0).choices[0].text
                 for p in prompts]
        assert [c.index for c in out.choices] == [0, 1, 2] and [c.text for c in out.choices] == alone
    mixed = HTTP.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", [0, 5]]})
    assert mixed.status_code == 400 and "list[list[int]]" in error_of(mixed)["message"]
    with pytest.raises(openai.BadRequestError, match="n"):
        server.client.completions.create(model="tiny", prompt="x", n=2)


def test_seed_temperature_top_p_and_stop_are_honoured(server):
    kwargs = dict(model="tiny+a", prompt="seeded", max_tokens=20, temperature=1.0, top_p=0.9)
    first = server.client.completions.create(seed=7, **kwargs).choices[0].text
    assert server.client.completions.create(seed=7, **kwargs).choices[0].text == first
    others = {server.client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert others != {first}
    greedy = server.client.completions.create(model="tiny", prompt="stop here", max_tokens=20, temperature=0).choices[0]
    stop = greedy.text[3:5]
    assert len(stop) == 2
    cut = server.client.completions.create(model="tiny", prompt="stop here", max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.text == greedy.text[: greedy.text.find(stop)] and cut.finish_reason == "stop"


def test_seeded_rows_sharing_a_batch_give_their_solo_text(server, tokenizer, models):
    requests = [dict(seed=3, temperature=1.0), dict(seed=11, temperature=0.7, top_p=0.9)]
    common = dict(model="tiny+a", prompt="seeded together", max_tokens=20)
    alone = [server.client.completions.create(**common, **r).choices[0].text for r in requests]  # module server: solo
    s = Server(served_models(tokenizer, models), max_batch_size=2, max_wait_ms=30_000)  # the batch starts with both
    try:
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda r: s.client.completions.create(**common, **r).choices[0].text, requests))
        assert re.search(r"^amendlm_batch_rows_total 2$", HTTP.get(s.url + "/metrics").text, re.M)
        assert together == alone  # exact on this fp32 model (in general: up to batching's floating-point near-ties)
    finally:
        s.close()


def test_greedy_sir_without_seed_is_deterministic(server):
    kwargs = dict(model="tiny+a", prompt="sir", max_tokens=12, temperature=0, extra_body={"mode": "sir", "candidates": 4})
    assert len({server.client.completions.create(**kwargs).choices[0].text for _ in range(3)}) == 1


def test_concurrent_requests_decode_in_one_batch_with_the_tokens_of_one_by_one(tokenizer, models):
    # max_wait long: the batch starts as soon as the 4 requests are queued, never before
    s = Server(served_models(tokenizer, models), max_batch_size=4, max_wait_ms=30_000)
    try:
        prompts = ["a", "a longer prompt", "mid one", "z"]
        expected = [library(tokenizer, models, encode_prompt(tokenizer, p, chat_template=False), "par", 8).text for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda p: s.client.completions.create(
                model="tiny+a", prompt=p, max_tokens=8, temperature=0, extra_body={"mode": "par"}).choices[0].text, prompts))
        assert texts == expected
        metrics = HTTP.get(s.url + "/metrics").text
        assert re.search(r"^amendlm_batches_total 1$", metrics, re.M) and re.search(r"^amendlm_batch_rows_total 4$", metrics, re.M)
    finally:
        s.close()


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_bad_input_is_an_openai_error_naming_the_field(server):
    url = server.url + "/v1/completions"
    bad_json = HTTP.post(url, content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in error_of(bad_json)["message"]
    wrong_type = HTTP.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": "many"})
    assert wrong_type.status_code == 400 and error_of(wrong_type)["param"] == "max_tokens"
    assert "max_tokens" in error_of(wrong_type)["message"] and "Traceback" not in wrong_type.text
    unknown_field = HTTP.post(url, json={"model": "tiny", "prompt": "x", "logprobs": 2})
    assert unknown_field.status_code == 400 and "logprobs" in error_of(unknown_field)["message"]
    bad_mode = HTTP.post(url, json={"model": "tiny+a", "prompt": "x", "mode": "parr"})
    assert bad_mode.status_code == 400 and error_of(bad_mode)["param"] == "mode" and "par-kl" in error_of(bad_mode)["message"]
    alone = HTTP.post(url, json={"model": "tiny", "prompt": "x", "mode": "par"})
    assert alone.status_code == 400 and "no aligner" in error_of(alone)["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        server.client.completions.create(model="nope", prompt="x")
    assert missing.value.status_code == 404 and "tiny, tiny+a" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_long:
        server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=300)
    message = too_long.value.body["message"]
    assert "300" in message and str(CONTEXT) in message and too_long.value.body["param"] == "max_tokens"


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


def metric(url: str, name: str) -> int:
    return int(re.search(rf"^{name} (\d+)$", HTTP.get(url + "/metrics").text, re.M).group(1))


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


def test_health_and_metrics(server):
    assert HTTP.get(server.url + "/health").json()["status"] == "ok"
    server.client.completions.create(model="tiny", prompt="count me", max_tokens=2)
    text = HTTP.get(server.url + "/metrics").text
    assert 'amendlm_requests_total{path="/v1/completions",code="200"}' in text
    for name in ("amendlm_queue_length", "amendlm_tokens_per_second", "amendlm_generated_tokens_total"):
        assert re.search(rf"^# TYPE {name} ", text, re.M)


def test_row_text_holds_back_a_possible_stop_string(tokenizer):
    ids = tokenizer("abcdef", add_special_tokens=False)["input_ids"]
    row = RowText(tokenizer, Sampling(max_tokens=10, stop=("cde",)))
    deltas = [row.add(i) for i in ids[:4]]
    assert "".join(deltas) == "ab" and row.finish_reason is None  # "cd" may begin the stop string
    assert row.add(ids[4]) == "" and row.finish_reason == "stop" and row.text == "ab"


def test_aligner_option_parsing():
    assert parse_aligner_option("small=runs/a") == ("small", "runs/a")
    assert parse_aligner_option("runs/ram/aligner/") == ("aligner", "runs/ram/aligner/")
    with pytest.raises(ValueError, match="NAME"):
        parse_aligner_option("a+b=dir")


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
        line, deadline = "", time.monotonic() + 120
        while "listening on" not in line:  # bounded: a server that never listens fails the test, never hangs it
            assert process.poll() is None, "server exited before listening"
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("server did not listen within 120 s")
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


@pytest.mark.integration
def test_the_embedded_model_served_alone_and_with_an_aligner(tmp_path):
    """Greedy chat through the server equals the library's generate for the same pair (the model's own
    first 2 blocks as the aligner); the model alone streams to [DONE]."""
    from amendlm.modeling import load_model
    from amendlm.ram.train import truncate_to_layers
    from amendlm.resources import DEFAULT_MODEL

    proposal, tokenizer = load_model(DEFAULT_MODEL)
    aligner, _ = load_model(DEFAULT_MODEL)
    truncate_to_layers(aligner, 2)
    s = Server(build_served("smol", proposal, tokenizer, {"l2": (aligner, tokenizer)}, DecodeConfig()), max_batch_size=4)
    try:
        question = "Name a colour."
        out = s.client.chat.completions.create(model="smol+l2", messages=[{"role": "user", "content": question}],
                                               max_tokens=6, temperature=0, extra_body={"mode": "par"})
        ids = encode_prompt(tokenizer, question, chat_template=True)
        expected = generate(proposal, aligner, [ids], DecodeConfig(mode="par"), GenerateConfig(max_new_tokens=6, greedy=True),
                            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_ids=[tokenizer.eos_token_id], tokenizer=tokenizer)[0]
        assert out.choices[0].message.content == expected.text and out.usage.prompt_tokens == len(ids)
        chunks = list(s.client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, stream=True,
                                                  temperature=0))
        assert "".join(c.choices[0].text for c in chunks).strip()
    finally:
        s.close()
