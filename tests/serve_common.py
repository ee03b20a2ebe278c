"""What the ``amendlm serve`` tests share (``test_serve.py``, ``test_serve_streams.py``): tiny random models,
a server on a free loopback port in a thread, the library's own decoding to compare with, and small HTTP helpers.

The fixtures are imported by name into each test module (module scope: each module gets its own server)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace

import httpx
import pytest

openai = pytest.importorskip("openai")

from amendlm.ram.decoding import DecodeConfig  # noqa: E402
from amendlm.ram.generate import GenerateConfig, generate  # noqa: E402
from amendlm.serve.models import build_served  # noqa: E402
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


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def metric(url: str, name: str) -> int:
    return int(re.search(rf"^{name} (\d+)$", HTTP.get(url + "/metrics").text, re.M).group(1))
