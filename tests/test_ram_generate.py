"""The batched, KV-cached decoding loop against an uncached one-prompt-at-a-time reference loop."""

from __future__ import annotations

import pytest
import torch

from amendlm.ram.api import RAMLogitsProcessor, ResidualAlignedLM
from amendlm.ram.decoding import DecodeConfig, apply_rule, get_mode
from amendlm.ram.generate import GenerateConfig, generate, shared_vocab_size

from .conftest import make_tiny_llama

EOS, PAD = 1, 2


@torch.no_grad()
def reference_loop(proposal, aligner, prompt, decode, max_new_tokens, vocab_size):
    """No cache, no padding, batch of one: rerun both models on the whole sequence every step."""
    ids, new = list(prompt), []
    mode = get_mode(decode.mode)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids])
        p = proposal(x).logits[:, -1, :vocab_size] if mode.uses_proposal else None
        a = aligner(x).logits[:, -1, :vocab_size] if mode.uses_aligner else None
        token = int(apply_rule(p, a, decode, eos_token_id=EOS).argmax(-1))
        if token == EOS:
            break
        new.append(token)
        ids.append(token)
    return new


@pytest.fixture(scope="module")
def models(byte_tokenizer):
    vocab = len(byte_tokenizer)
    return make_tiny_llama(vocab, seed=0), make_tiny_llama(vocab, seed=1)


@pytest.fixture(scope="module")
def prompts(byte_tokenizer):
    texts = ["a much longer prompt than the others", "hi", "mid length", "x"]
    return [[0, *byte_tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]


@pytest.mark.parametrize("mode", ["par", "par-kl", "mds", "proposal", "aligner"])
def test_batched_cached_equals_uncached_one_by_one(models, prompts, byte_tokenizer, mode):
    proposal, aligner = models
    vocab = len(byte_tokenizer)
    decode = DecodeConfig(mode=mode, kl_threshold=0.05)
    config = GenerateConfig(max_new_tokens=10, greedy=True, batch_size=4)
    out = generate(proposal, aligner, prompts, decode, config, vocab_size=vocab, pad_token_id=PAD, eos_token_ids=[EOS])
    for prompt, generation in zip(prompts, out):
        assert generation.token_ids == reference_loop(proposal, aligner, prompt, decode, 10, vocab)


def test_sampling_is_seeded(models, prompts, byte_tokenizer):
    proposal, aligner = models
    kwargs = dict(vocab_size=len(byte_tokenizer), pad_token_id=PAD, eos_token_ids=[EOS])
    decode = DecodeConfig(mode="sir", candidates=4)
    first = generate(proposal, aligner, prompts, decode, GenerateConfig(max_new_tokens=6, seed=3), **kwargs)
    again = generate(proposal, aligner, prompts, decode, GenerateConfig(max_new_tokens=6, seed=3), **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    other = generate(proposal, aligner, prompts, decode, GenerateConfig(max_new_tokens=6, seed=4), **kwargs)
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_stop_strings_max_new_tokens_and_streaming(models, prompts, byte_tokenizer):
    proposal, aligner = models
    kwargs = dict(vocab_size=len(byte_tokenizer), pad_token_id=PAD, eos_token_ids=[EOS], tokenizer=byte_tokenizer)
    free = generate(proposal, aligner, prompts, DecodeConfig(mode="proposal"), GenerateConfig(max_new_tokens=8, greedy=True), **kwargs)
    assert all(len(g.token_ids) <= 8 for g in free)
    text = free[0].text
    assert free[0].finish_reason == "length" and len(text) >= 3
    stop = text[2]  # a character the greedy continuation is known to produce
    steps = []
    stopped = generate(proposal, aligner, prompts[:1], DecodeConfig(mode="proposal"),
                       GenerateConfig(max_new_tokens=8, greedy=True, stop=(stop,)),
                       on_step=lambda step, ids, done: steps.append((step, ids.tolist(), done.tolist())), **kwargs)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].text == text[: text.index(stop)]
    assert steps[-1][2] == [True] and len(steps) == len(stopped[0].token_ids)


def test_padded_embedding_rows_are_sliced_and_real_mismatch_fails(byte_tokenizer, prompts):
    vocab = len(byte_tokenizer)
    proposal = make_tiny_llama(vocab, seed=0)
    padded = make_tiny_llama(vocab + 13, seed=1)  # embedding padded past the tokenizer
    with torch.no_grad():
        padded.lm_head.weight[vocab:] = 50.0 * padded.lm_head.weight[:13].abs().sum(-1, keepdim=True)
    ram = ResidualAlignedLM(proposal, padded, byte_tokenizer, DecodeConfig(mode="mds"))
    out = ram.generate_ids(prompts, config=GenerateConfig(max_new_tokens=5, greedy=True))
    assert all(t < vocab for g in out for t in g.token_ids)

    small = make_tiny_llama(vocab - 1, seed=2)
    with pytest.raises(ValueError, match="model 'tiny-small' has .* rows .* proposal 'tiny-proposal'"):
        shared_vocab_size(byte_tokenizer, byte_tokenizer, "tiny-proposal", "tiny-small", proposal, small)


def test_different_vocabularies_fail_naming_both(byte_tokenizer, tmp_path):
    from .conftest import make_byte_tokenizer

    changed = make_byte_tokenizer()
    changed.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="proposal 'model-a' .* aligner 'model-b' .* different vocabularies"):
        shared_vocab_size(byte_tokenizer, changed, "model-a", "model-b")


def test_generate_shaped_api_and_logits_processor_match_the_loop(models, prompts, byte_tokenizer):
    proposal, aligner = models
    ram = ResidualAlignedLM(proposal, aligner, byte_tokenizer, DecodeConfig(mode="par"))
    loop = ram.generate_ids(prompts, config=GenerateConfig(max_new_tokens=6, greedy=True))
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = ram.generate(input_ids, attention_mask, max_new_tokens=6, do_sample=False)
    for row, generation in enumerate(loop):
        assert out[row, width: width + len(generation.token_ids)].tolist() == generation.token_ids

    processor = RAMLogitsProcessor(aligner, DecodeConfig(mode="par"), len(byte_tokenizer), attention_mask, eos_token_id=EOS)
    hf = proposal.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                           do_sample=False, max_new_tokens=6, pad_token_id=PAD, eos_token_id=EOS)
    for row, generation in enumerate(loop):
        assert hf[row, width: width + len(generation.token_ids)].tolist() == generation.token_ids


def test_decode_steps_pruning_ended_rows_keeps_the_other_rows_tokens(models, prompts, byte_tokenizer):
    """Rows stopped by the consumer (here row 0 after 2 tokens) leave the KV caches; the others decode as before."""
    from amendlm.ram.generate import decode_steps

    proposal, aligner = models
    kwargs = dict(vocab_size=len(byte_tokenizer), pad_token_id=PAD, eos_token_ids=[], greedy=True)

    def run(prune: bool) -> list[list[int]]:
        rows = [[] for _ in prompts]
        for state in decode_steps(proposal, aligner, prompts, DecodeConfig(mode="par"), 8, prune_finished=prune, **kwargs):
            for row in state.active.nonzero().flatten().tolist():
                rows[row].append(int(state.next_ids[row]))
            if state.step == 1:
                with torch.inference_mode():
                    state.finished[0] = True
        return rows

    pruned, kept = run(True), run(False)
    assert len(pruned[0]) == len(kept[0]) == 2 and all(len(r) == 8 for r in pruned[1:])
    assert pruned == kept


def test_the_logits_processor_runs_a_training_aligner_in_eval_mode_and_restores_its_modes(models, prompts, byte_tokenizer):
    """An aligner with dropout left in train mode by its caller decodes as its eval-mode self, every time."""
    proposal, _ = models
    vocab = len(byte_tokenizer)
    aligner = make_tiny_llama(vocab, seed=1, attention_dropout=0.5).train()
    aligner.model.layers[0].eval()  # a submodule the caller froze stays frozen afterwards
    before = [m.training for m in aligner.modules()]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = (input_ids != PAD).long()

    def decode():
        processor = RAMLogitsProcessor(aligner, DecodeConfig(mode="par"), vocab, attention_mask, eos_token_id=EOS)
        first = processor(input_ids, proposal(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1])
        out = proposal.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6,
                                logits_processor=[RAMLogitsProcessor(aligner, DecodeConfig(mode="par"), vocab,
                                                                     attention_mask, eos_token_id=EOS)],
                                pad_token_id=PAD, eos_token_id=EOS)
        return first, out

    with torch.no_grad():
        (first_a, out_a), (first_b, out_b) = decode(), decode()
        assert [m.training for m in aligner.modules()] == before
        aligner.eval()
        first_eval, out_eval = decode()
        aligner.train()  # the test can fail: in train mode this aligner's dropout changes its logits
        assert not torch.equal(aligner(input_ids=input_ids).logits, aligner(input_ids=input_ids).logits)
    assert torch.equal(first_a, first_b) and torch.equal(first_a, first_eval)
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_eval)


def test_generation_stats_count_par_kl_fallbacks_and_argmax_agreement_exactly(models, prompts, byte_tokenizer):
    """The loop's counts equal a one-prompt-at-a-time recount of KL(P_M || Q) > threshold and of the argmaxes."""
    from amendlm.ram.decoding import kl_divergence
    from amendlm.ram.generate import GenerationStats

    proposal, aligner = models
    vocab = len(byte_tokenizer)
    threshold = 0.0124  # the tiny random models' per-step KLs are 0.011-0.014 nats
    decode = DecodeConfig(mode="par-kl", kl_threshold=threshold)
    stats = GenerationStats()
    out = generate(proposal, aligner, prompts, decode, GenerateConfig(max_new_tokens=6, greedy=True, batch_size=4),
                   vocab_size=vocab, pad_token_id=PAD, eos_token_ids=[EOS], stats=stats)
    steps = fallbacks = follows_aligner = follows_proposal = 0
    margin = 1.0
    with torch.no_grad():
        for prompt, generation in zip(prompts, out):
            ids = list(prompt)
            chosen = generation.token_ids + ([EOS] if len(generation.token_ids) < 6 else [])
            for token in chosen:
                x = torch.tensor([ids])
                p, a = proposal(x).logits[:, -1, :vocab], aligner(x).logits[:, -1, :vocab]
                steps += 1
                kl = kl_divergence(p, a).item()
                fallbacks += int(kl > threshold)
                margin = min(margin, abs(kl - threshold))
                follows_aligner += int(a.argmax().item() == token)
                follows_proposal += int(p.argmax().item() == token)
                ids.append(token)
    assert 0 < fallbacks < steps and margin > 1e-6  # the threshold splits the steps, none on the edge
    assert (stats.choices.steps, stats.choices.fallback) == (steps, fallbacks)
    assert (stats.choices.aligner_argmax, stats.choices.proposal_argmax) == (follows_aligner, follows_proposal)
    assert stats.choices.rates()["fallback_rate"] == pytest.approx(fallbacks / steps)
