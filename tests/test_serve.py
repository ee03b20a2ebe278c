"""``amendlm serve`` through the official ``openai`` client (and raw HTTP for what the client hides),
against a server on a free loopback port serving tiny random models: one proposal alone and with an aligner.
What requests get (texts equal to the library's decoding, batching, sampling options, errors, metrics);
streams, back-pressure, clients leaving and shutdown are in ``test_serve_streams.py``."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from amendlm.ram.data import encode_prompt
from amendlm.ram.decoding import DecodeConfig
from amendlm.ram.generate import GenerateConfig, generate
from amendlm.serve.models import build_served, parse_aligner_option
from amendlm.serve.rows import RowText, Sampling

from .serve_common import (CONTEXT, HTTP, Server, error_of, library, openai, served_models,  # noqa: F401 (fixtures)
                           models, server, tokenizer)


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


def test_aligner_option_parsing(tmp_path):
    assert parse_aligner_option("small=runs/a") == ("small", "runs/a")
    (tmp_path / "ram" / "aligner").mkdir(parents=True)
    assert parse_aligner_option(f"{tmp_path}/ram/aligner/") == ("aligner", f"{tmp_path}/ram/aligner/")  # a directory here
    with pytest.raises(ValueError, match="NAME"):
        parse_aligner_option("a+b=dir")
    assert parse_aligner_option("smollm2-135m-instruct") == ("smollm2-135m-instruct", "smollm2-135m-instruct")  # embedded: local
    # no '=', no embedded name and no such local path: refused, not taken for a hub id (which would fail only after
    # the hub's retries)
    for value in ("noequals", f"{tmp_path}/ram/other", "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(ValueError, match=f"--aligner {value}: expected NAME=DIR"):
            parse_aligner_option(value)


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
