"""Shared fixtures: a tiny byte-level tokenizer and a tiny randomly initialised Llama."""

from __future__ import annotations

import pytest
import torch


def make_byte_tokenizer():
    """A 259-token byte-level BPE tokenizer with no merges: one token per UTF-8 byte + 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for symbol in sorted(byte_symbols):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer, 32-wide Llama with random weights (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


@pytest.fixture(scope="session", autouse=True)
def fp32_auto_dtype():
    """``--dtype auto`` resolves to fp32 in every test and every process it starts (AMENDLM_CPU_BF16=0): the
    timing probe can answer differently in two processes whose results a test compares."""
    import os

    saved = os.environ.get("AMENDLM_CPU_BF16")
    os.environ["AMENDLM_CPU_BF16"] = "0"
    yield
    if saved is None:
        os.environ.pop("AMENDLM_CPU_BF16", None)
    else:
        os.environ["AMENDLM_CPU_BF16"] = saved


@pytest.fixture(scope="session", autouse=True)
def private_hash_cache(tmp_path_factory):
    """Keep the tests' file hashes out of the real ``~/.cache/amendlm/sha256.json``.

    Only the hash cache moves: ``AMENDLM_HOME`` (with the embedded models' conversions that the
    integration tests reuse) stays where it is.
    """
    import os

    saved = os.environ.get("AMENDLM_HASH_CACHE")
    os.environ["AMENDLM_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "sha256.json")
    yield os.environ["AMENDLM_HASH_CACHE"]
    if saved is None:
        os.environ.pop("AMENDLM_HASH_CACHE", None)
    else:
        os.environ["AMENDLM_HASH_CACHE"] = saved


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture()
def tiny_llama(byte_tokenizer):
    return make_tiny_llama(len(byte_tokenizer))


@pytest.fixture
def one_thread():
    """Tiny matmuls are slower with two threads on a busy 2-core machine: one thread for the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def captured(monkeypatch):
    """`amendlm.unlearn.trainer.train` replaced by a stub: the list of the configurations it was given."""
    from amendlm.unlearn import trainer

    seen = []

    def fake_train(config, resume=False, on_record=None):
        seen.append(config)
        return trainer.TrainResult("completed", 0, config.out, None, None, 0.0)

    monkeypatch.setattr(trainer, "train", fake_train)
    return seen
