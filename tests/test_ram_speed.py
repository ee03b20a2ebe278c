"""The fast paths of RAM decoding give what the plain ones give: the top-k nucleus against a full sort,
the rules' skipped work, and a prefill that computes the head at the last position only."""

from __future__ import annotations

import math

import pytest
import torch

from amendlm.ram import masks
from amendlm.ram.cached import CachedLM, left_pad
from amendlm.ram.decoding import MODES, DecodeConfig, apply_rule
from amendlm.ram.generate import GenerateConfig, generate

from .conftest import make_tiny_llama

EOS, PAD = 1, 2


def full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by one full sort of every row (the rule before the top-k path)."""
    sorted_logits, order = logits.float().sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1).nan_to_num(0.0)
    keep = ((probs.cumsum(-1) - probs) < top_p) & torch.isfinite(sorted_logits)
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def peaked_rows(vocab: int = 6000, seed: int = 0) -> torch.Tensor:
    """Rows from very peaked to flat, so that every top-k size and the full sort are used."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([40.0, 20.0, 12.0, 8.0, 6.0, 4.0, 2.0, 0.5]).unsqueeze(-1)
    return torch.randn(len(scales), vocab, generator=generator) * scales


@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.95, 1.0])
def test_top_p_mask_equals_a_full_sort(top_p):
    logits = peaked_rows()
    logits[1, ::3] = -math.inf  # excluded tokens
    logits[2] = -math.inf  # an empty row keeps its argmax
    assert torch.equal(masks.top_p_mask(logits, top_p), full_sort_top_p(logits, top_p))


def test_a_peaked_row_never_sorts_the_whole_vocabulary(monkeypatch):
    sorted_rows = []
    full = masks._top_p_mask_sorted
    monkeypatch.setattr(masks, "_top_p_mask_sorted", lambda x, p: sorted_rows.append(len(x)) or full(x, p))
    logits = peaked_rows()
    sizes = masks.top_p_mask(logits, 0.95).sum(-1)
    assert sizes[0] <= masks.TOP_P_CANDIDATES[0] and sizes[-1] > masks.TOP_P_CANDIDATES[-1]  # both paths are used
    assert sorted_rows == [int((sizes > masks.TOP_P_CANDIDATES[-1]).sum())]  # only the flat rows were sorted


@pytest.mark.parametrize("mode", list(MODES))
def test_every_rule_gives_what_it_gave_with_full_sorts(mode, monkeypatch):
    proposal, aligner = peaked_rows(seed=1), peaked_rows(seed=2).flip(0)
    proposal[3, 5:] = -math.inf
    aligner[4] = -math.inf  # an aligner with no support on a row: the fallbacks run
    config = DecodeConfig(mode=mode, kl_threshold=0.5)
    fast = apply_rule(proposal, aligner, config, eos_token_id=EOS, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(masks, "TOP_P_CANDIDATES", ())
    plain = apply_rule(proposal, aligner, config, eos_token_id=EOS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, plain)


@pytest.fixture(scope="module")
def peaked_models():
    """Two tiny Llamas over a 6000-token vocabulary with sharpened heads (peaked next-token distributions)."""
    models = []
    for seed in (0, 1):
        model = make_tiny_llama(6000, seed=seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(60.0)
        models.append(model)
    return models


@pytest.mark.parametrize("mode", ["par", "par-kl", "sir"])
def test_generation_gives_the_same_tokens_as_with_full_sorts(peaked_models, mode, monkeypatch, one_thread):
    proposal, aligner = peaked_models
    prompts = [[0, 17, 400, 3000, 9], [0, 5], [0, 2500, 2501]]
    kwargs = dict(vocab_size=6000, pad_token_id=PAD, eos_token_ids=[EOS])
    decode, config = DecodeConfig(mode=mode), GenerateConfig(max_new_tokens=8, greedy=mode != "sir", seed=3)
    fast = [g.token_ids for g in generate(proposal, aligner, prompts, decode, config, **kwargs)]
    monkeypatch.setattr(masks, "TOP_P_CANDIDATES", ())
    assert fast == [g.token_ids for g in generate(proposal, aligner, prompts, decode, config, **kwargs)]


def test_prefill_computes_the_head_at_the_last_position_only_and_matches_a_full_forward(tiny_llama):
    prompts = [[0, 5, 6, 7, 8, 9], [0, 40], [0, 41, 42]]
    heads = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda module, args, out: heads.append(tuple(out.shape)))
    try:
        ids, mask = left_pad(prompts, PAD)
        logits = CachedLM(tiny_llama, tiny_llama.config.vocab_size).prefill(ids, mask)
    finally:
        hook.remove()
    assert heads == [(3, 1, tiny_llama.config.vocab_size)]  # one position per row, not 6
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # each prompt alone, unpadded, every position's logits
            alone = tiny_llama(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, rtol=1e-5, atol=1e-5)
