"""RAM on the embedded SmolLM2-135M-Instruct: chat-templated XSum prompts, a few decoding steps."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_embedded_proposal_with_first_layers_aligner_decodes():
    from amendlm.modeling import load_model
    from amendlm.ram.api import ResidualAlignedLM
    from amendlm.ram.data import TaskConfig, encode_prompt, load_task
    from amendlm.ram.decoding import DecodeConfig
    from amendlm.ram.generate import GenerateConfig
    from amendlm.ram.train import truncate_to_layers

    proposal, tokenizer = load_model("smollm2-135m-instruct")
    aligner, _ = load_model("smollm2-135m-instruct")
    truncate_to_layers(aligner, 2)
    record = load_task(TaskConfig(split="test", limit=1, max_document_tokens=48), tokenizer)[0]
    ids = encode_prompt(tokenizer, record.prompt)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # chat template, one start token
    assert ids.count(ids[0]) >= 2 and tokenizer.decode(ids).rstrip().endswith("assistant")
    ram = ResidualAlignedLM(proposal, aligner, tokenizer, DecodeConfig(mode="par-kl"))
    assert ram.vocab_size == len(tokenizer) == 49152
    out = ram.generate_ids([ids], config=GenerateConfig(max_new_tokens=3, greedy=True))
    assert 1 <= len(out[0].token_ids) <= 3 or out[0].finish_reason == "eos"
    proposal_only = ram.generate_ids([ids], mode="proposal", config=GenerateConfig(max_new_tokens=3, greedy=True))
    assert proposal_only[0].text.strip()
