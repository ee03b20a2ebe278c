"""The batched scorer equals a plain one-sequence-at-a-time loop."""

import math

import pytest
import torch

from amendlm.scoring import collate, encode_pairs, length_buckets, score_pairs, sequence_logps, token_logps

PAIRS = [
    ("", "The nurse was caring."),
    ("My neighbour is from Spain.", " She cooks paella every day of the week."),
    ("", "Hi"),
    ("A", " b"),
    ("The chess player was", " asian."),
    ("", "An unusually long sentence that makes the batch need a lot of padding on the others."),
]


def reference_logps(model, tokenizer, prefix, continuation):
    """One forward per pair, no padding, explicit loop over continuation tokens."""
    prefix_ids = [tokenizer.bos_token_id] + tokenizer(prefix, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    total = torch.zeros((), dtype=torch.float32)
    for offset, token in enumerate(cont_ids):
        total += logp[len(prefix_ids) - 1 + offset, token]
    return total.item(), len(cont_ids)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_batched_scores_equal_unbatched_loop(tiny_llama, byte_tokenizer, padding_side, batch_size):
    scores = score_pairs(tiny_llama, byte_tokenizer, PAIRS, batch_size=batch_size, padding_side=padding_side)
    for index, (prefix, continuation) in enumerate(PAIRS):
        expected, count = reference_logps(tiny_llama, byte_tokenizer, prefix, continuation)
        assert scores.n_tokens[index].item() == count
        # per-token mean within 1e-5; the sum of ~90 fp32 terms within float32 rounding (1e-6 relative)
        assert scores.logp_mean[index].item() == pytest.approx(expected / count, abs=1e-5)
        assert scores.logp_sum[index].item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(scores.logp_mean, scores.logp_sum / scores.n_tokens)


def test_sequence_logps_hand_computed():
    # vocab 2, logits [0, ln 3] -> p = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    input_ids = torch.tensor([[0, 1, 0]])
    loss_mask = torch.tensor([[0, 1, 1]])  # score tokens at positions 1 and 2
    total, count = sequence_logps(logits, input_ids, loss_mask)
    assert count.tolist() == [2]
    assert total.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 4))


def test_token_logps_normalises():
    logits = torch.randn(4, 7)
    all_ids = torch.arange(7).expand(4, 7)
    probs = token_logps(logits.unsqueeze(1).expand(4, 7, 7), all_ids).exp().sum(-1)
    assert torch.allclose(probs, torch.ones(4))


def test_collate_masks_and_positions(byte_tokenizer):
    encoded = encode_pairs(byte_tokenizer, [("ab", "c"), ("", "defg")])
    # ids: [<s> a b c] (4 tokens, 1 scored) and [<s> d e f g] (5 tokens, 4 scored)
    left = collate(encoded, pad_id=2, padding_side="left")
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert left["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert left["loss_mask"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 1, 1, 1]]
    right = collate(encoded, pad_id=2, padding_side="right")
    assert right["input_ids"][0].tolist()[-1] == 2
    assert right["position_ids"].tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 4]]
    assert right["loss_mask"].tolist() == [[0, 0, 0, 1, 0], [0, 1, 1, 1, 1]]


def test_start_token_is_prepended_once(byte_tokenizer):
    encoded = encode_pairs(byte_tokenizer, [("", "x")])
    assert encoded[0].ids[0] == byte_tokenizer.bos_token_id
    assert encoded[0].ids.count(byte_tokenizer.bos_token_id) == 1
    eos_start = encode_pairs(byte_tokenizer, [("", "x")], start_token="eos")
    assert eos_start[0].ids[0] == byte_tokenizer.eos_token_id


def test_empty_continuation_is_an_error(byte_tokenizer):
    with pytest.raises(ValueError, match="pair 1"):
        encode_pairs(byte_tokenizer, [("a", "b"), ("a", "")])


def test_length_buckets_cover_every_index_once():
    buckets = length_buckets([5, 1, 9, 3, 7], batch_size=2)
    assert sorted(i for b in buckets for i in b) == [0, 1, 2, 3, 4]
    assert buckets[0] == [2, 4]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_shared_prefix_packing_equals_separate_scoring(byte_tokenizer, batch_size, attention):
    from .conftest import make_tiny_llama

    tiny_llama = make_tiny_llama(len(byte_tokenizer), attn_implementation=attention)
    pairs = [
        ("", "The chess player was asian."), ("", "The chess player was hispanic."), ("", "The chess player was fox."),
        ("Many people live in Ethiopia.", " They run."), ("Many people live in Ethiopia.", " They are fat."),
        ("Many people live in Ethiopia.", " Cats have sharp claws."),
        ("", "Same"), ("", "Same"), ("", "Sa"),  # identical members and a member that is a prefix of others
    ]
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    separate = score_pairs(tiny_llama, byte_tokenizer, pairs, batch_size=4)
    shared = score_pairs(tiny_llama, byte_tokenizer, pairs, batch_size=batch_size, groups=groups)
    assert torch.equal(shared.n_tokens, separate.n_tokens)
    assert torch.allclose(shared.logp_sum, separate.logp_sum, rtol=1e-6, atol=1e-5)


def test_shared_prefix_groups_must_partition(tiny_llama, byte_tokenizer):
    with pytest.raises(ValueError, match="exactly once"):
        score_pairs(tiny_llama, byte_tokenizer, [("", "a"), ("", "b")], groups=[[0]])


def test_shared_prefix_refuses_kernels_without_mask_support(tiny_llama, byte_tokenizer):
    tiny_llama.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="--no-share-prefix"):
        score_pairs(tiny_llama, byte_tokenizer, [("", "a"), ("", "b")], groups=[[0, 1]])


def test_start_token_is_not_doubled_by_a_tokenizer_that_adds_bos():
    """A tokenizer whose post-processor adds <s> must still yield exactly one start token."""
    from tokenizers.processors import TemplateProcessing

    from .conftest import make_byte_tokenizer

    tokenizer = make_byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert tokenizer("x")["input_ids"][0] == 0  # the tokenizer itself adds BOS
    (encoded,) = encode_pairs(tokenizer, [("ab", " c")])
    assert encoded.ids.count(0) == 1 and encoded.ids[0] == 0 and encoded.n_scored == 2


def test_continuation_tokens_come_from_the_whole_text():
    """With merges across words, a continuation is scored on the tokens of the full sentence."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "a": 1, "b": 2, "ab": 3, "c": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    (encoded,) = encode_pairs(tokenizer, [("c", "ab")])
    assert encoded.ids == [0, 4, 3] and encoded.n_scored == 1
    with pytest.raises(ValueError, match="pair 0: a token spans the boundary"):
        encode_pairs(tokenizer, [("a", "b")])
