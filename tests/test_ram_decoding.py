"""The pure RAM decoding rules on fixed logits (no model): what each mode keeps and how it weighs it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from amendlm.ram.choices import ChoiceCounts, choice_flags
from amendlm.ram.decoding import (
    MODES, DecodeConfig, apply_rule, get_mode, kl_divergence, pick_tokens, repetition_penalty, sir_weights, top_p_mask,
)

# proposal probabilities 0.5, 0.3, 0.16, 0.03, 0.01 -> top-p 0.95 nucleus = first three tokens (0.96)
PROPOSAL_PROBS = torch.tensor([[0.5, 0.3, 0.16, 0.03, 0.01]])
PROPOSAL = PROPOSAL_PROBS.log()
ALIGNER = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]])


def test_top_p_mask_keeps_smallest_set_reaching_p():
    assert top_p_mask(PROPOSAL, 0.95).tolist() == [[True, True, True, False, False]]
    assert top_p_mask(PROPOSAL, 0.5).tolist() == [[True, False, False, False, False]]
    assert top_p_mask(PROPOSAL, 0.81).tolist() == [[True, True, True, False, False]]
    assert top_p_mask(PROPOSAL, 1e-6).sum() == 1  # always the argmax


def test_par_keeps_exactly_the_proposal_nucleus_and_renormalises_the_aligner():
    config = DecodeConfig(mode="par", aligner_top_p=1.0, eos_priority=False)
    probs = apply_rule(PROPOSAL, ALIGNER, config).softmax(-1)
    q = ALIGNER.softmax(-1)
    expected = torch.zeros_like(q)
    expected[:, :3] = q[:, :3] / q[:, :3].sum()
    torch.testing.assert_close(probs, expected)
    assert (probs[:, 3:] == 0).all()  # token 3 is the aligner's favourite but outside the nucleus


def test_par_aligner_top_p_then_eos_priority():
    # renormalised aligner on the nucleus: e^0, e^1, e^2 over their sum = 0.090, 0.245, 0.665
    config = DecodeConfig(mode="par", aligner_top_p=0.9, eos_priority=False)
    assert torch.isfinite(apply_rule(PROPOSAL, ALIGNER, config)).tolist() == [[False, True, True, False, False]]
    eos_first = DecodeConfig(mode="par", eos_priority=True)
    out = apply_rule(PROPOSAL, ALIGNER, eos_first, eos_token_id=0)  # proposal argmax is token 0 = EOS
    assert torch.isfinite(out).tolist() == [[True, False, False, False, False]]
    assert apply_rule(PROPOSAL, ALIGNER, eos_first, eos_token_id=4).argmax().item() == 2  # not EOS: PAR


def test_par_kl_switches_to_the_proposal_above_the_threshold():
    kl = kl_divergence(PROPOSAL, ALIGNER).item()
    p = PROPOSAL_PROBS[0]
    q = ALIGNER.softmax(-1)[0]
    assert kl == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    below = DecodeConfig(mode="par-kl", kl_threshold=kl + 1e-3, aligner_top_p=1.0, eos_priority=False)
    above = DecodeConfig(mode="par-kl", kl_threshold=kl - 1e-3, aligner_top_p=1.0, eos_priority=False)
    par = DecodeConfig(mode="par", aligner_top_p=1.0, eos_priority=False)
    torch.testing.assert_close(apply_rule(PROPOSAL, ALIGNER, below), apply_rule(PROPOSAL, ALIGNER, par))
    nucleus = torch.tensor([[0.5, 0.3, 0.16, 0.0, 0.0]]) / 0.96
    torch.testing.assert_close(apply_rule(PROPOSAL, ALIGNER, above).softmax(-1), nucleus)


def test_par_kl_decides_per_row():
    proposal = torch.cat([PROPOSAL, ALIGNER])  # row 1: proposal == aligner, KL 0
    aligner = torch.cat([ALIGNER, ALIGNER])
    config = DecodeConfig(mode="par-kl", kl_threshold=0.1, aligner_top_p=1.0, eos_priority=False)
    out = apply_rule(proposal, aligner, config).softmax(-1)
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.3, 0.16, 0.0, 0.0]) / 0.96)  # switched
    par = apply_rule(ALIGNER, ALIGNER, DecodeConfig(mode="par", aligner_top_p=1.0, eos_priority=False))
    torch.testing.assert_close(out[1], par.softmax(-1)[0])


def test_mds_is_the_normalised_product():
    config = DecodeConfig(mode="mds", proposal_temperature=0.7, aligner_temperature=1.3)
    product = (PROPOSAL / 0.7).softmax(-1) * (ALIGNER / 1.3).softmax(-1)
    torch.testing.assert_close(apply_rule(PROPOSAL, ALIGNER, config).softmax(-1), product / product.sum())


def test_uniform_aligner_leaves_the_proposal_unchanged_under_mds_but_not_par():
    uniform = torch.zeros_like(PROPOSAL)
    config = DecodeConfig(mode="mds")
    torch.testing.assert_close(apply_rule(PROPOSAL, uniform, config).softmax(-1), PROPOSAL_PROBS)
    # PAR samples the aligner alone on the proposal's support: uniform over the nucleus
    par = DecodeConfig(mode="par", aligner_top_p=1.0, eos_priority=False)
    torch.testing.assert_close(apply_rule(PROPOSAL, uniform, par).softmax(-1), torch.tensor([[1 / 3] * 3 + [0.0] * 2]))


def sir_exact(p: torch.Tensor, q: torch.Tensor, n: int) -> torch.Tensor:
    """P(SIR returns v) = sum over all n-draw sequences of prod p * c_v q_v / sum_u c_u q_u."""
    vocab = len(p)
    out = torch.zeros(vocab, dtype=torch.float64)
    for draw in itertools.product(range(vocab), repeat=n):
        counts = torch.bincount(torch.tensor(draw), minlength=vocab).double()
        weights = counts * q
        out += math.prod(p[i].item() for i in draw) * weights / weights.sum()
    return out


CHI2_DF4_999 = 18.467  # 0.999 quantile of chi-square with 4 degrees of freedom


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_sir_frequencies_match_the_self_normalised_distribution():
    n_draws, candidates = 40_000, 3
    config = DecodeConfig(mode="sir", candidates=candidates, proposal_top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    logits = apply_rule(PROPOSAL.expand(n_draws, -1), ALIGNER.expand(n_draws, -1), config, generator=generator)
    tokens = pick_tokens(logits, greedy=False, generator=generator)
    observed = torch.bincount(tokens, minlength=5).double()
    p, q = PROPOSAL_PROBS[0].double(), ALIGNER.softmax(-1)[0].double()
    exact = sir_exact(p, q, candidates)
    assert exact.sum().item() == pytest.approx(1.0)
    assert chi_square(observed, exact) < CHI2_DF4_999
    # the test has power: with n = 3 SIR is not yet the product P_M * Q / Z
    product = p * q / (p * q).sum()
    assert chi_square(observed, product) > 10 * CHI2_DF4_999


def test_sir_only_returns_drawn_candidates():
    config = DecodeConfig(mode="sir", candidates=2)
    logits = apply_rule(PROPOSAL.expand(100, -1), ALIGNER.expand(100, -1), config, generator=torch.Generator().manual_seed(1))
    assert (torch.isfinite(logits).sum(-1) == 1).all()  # the resampled token alone
    assert not torch.isfinite(logits[:, 3:]).any()  # outside the 0.95 nucleus


def test_sir_weights_are_count_times_aligner_probability_self_normalised():
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0]])
    q = ALIGNER.softmax(-1)
    weights = sir_weights(counts, q.log()).softmax(-1)
    expected = torch.tensor([[2 * q[0, 0], q[0, 1], 0.0, 0.0, 0.0]])
    torch.testing.assert_close(weights, expected / expected.sum())  # 2 e^0 : e^1 = 0.424 : 0.576


def test_sir_stays_a_seeded_draw_when_the_loop_is_greedy():
    """Greedy picking of SIR's logits is the SIR draw itself (not the argmax of its weights: best of n)."""
    n_draws, candidates = 40_000, 3
    config = DecodeConfig(mode="sir", candidates=candidates, proposal_top_p=1.0)
    logits = apply_rule(PROPOSAL.expand(n_draws, -1), ALIGNER.expand(n_draws, -1), config,
                        generator=torch.Generator().manual_seed(0))
    greedy = pick_tokens(logits, greedy=True)
    assert torch.equal(greedy, pick_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(5)))
    p, q = PROPOSAL_PROBS[0].double(), ALIGNER.softmax(-1)[0].double()
    assert chi_square(torch.bincount(greedy, minlength=5).double(), sir_exact(p, q, candidates)) < CHI2_DF4_999
    # reproducible: the same seed gives the same draws, another seed other draws
    again = apply_rule(PROPOSAL.expand(50, -1), ALIGNER.expand(50, -1), config, generator=torch.Generator().manual_seed(7))
    same = apply_rule(PROPOSAL.expand(50, -1), ALIGNER.expand(50, -1), config, generator=torch.Generator().manual_seed(7))
    other = apply_rule(PROPOSAL.expand(50, -1), ALIGNER.expand(50, -1), config, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again.argmax(-1), same.argmax(-1)) and not torch.equal(again.argmax(-1), other.argmax(-1))


def test_one_candidate_sir_is_a_proposal_draw_and_best_of_n_is_the_aligners_pick():
    # candidates = 1: nothing to resample, the token is the proposal draw (nucleus 0.5, 0.3, 0.16 over 0.96)
    one = DecodeConfig(mode="sir", candidates=1)
    tokens = apply_rule(PROPOSAL.expand(20_000, -1), ALIGNER.expand(20_000, -1), one,
                        generator=torch.Generator().manual_seed(0)).argmax(-1)
    nucleus = torch.tensor([0.5, 0.3, 0.16, 0.0, 0.0], dtype=torch.float64) / 0.96
    observed = torch.bincount(tokens, minlength=5).double()[:3]
    assert chi_square(observed, nucleus[:3]) < 13.816  # chi-square, 2 degrees of freedom, 0.999
    # best of n with many draws: every nucleus token is drawn, the aligner's favourite among them wins
    best = DecodeConfig(mode="sir-best", candidates=64)
    picked = apply_rule(PROPOSAL.expand(10, -1), ALIGNER.expand(10, -1), best, generator=torch.Generator().manual_seed(0))
    assert picked.argmax(-1).tolist() == [2] * 10  # aligner logits 0, 1, 2 on the nucleus; token 3 is outside it
    assert (torch.isfinite(picked).sum(-1) == 1).all()


def test_choice_flags_by_hand():
    proposal = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    aligner = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 5.0]])
    tokens = torch.tensor([1, 2])
    p, q = proposal[0].softmax(-1), aligner[0].softmax(-1)
    kl_row0 = float((p * (p / q).log()).sum())  # 1.77 nats; row 1: identical distributions, 0
    config = DecodeConfig(mode="par-kl", kl_threshold=0.1)
    flags = choice_flags(config, proposal, aligner, tokens)
    assert kl_row0 > 0.1 and flags["fallback"].tolist() == [True, False]
    assert flags["aligner_argmax"].tolist() == [True, True] and flags["proposal_argmax"].tolist() == [False, True]
    assert choice_flags(DecodeConfig(mode="par"), proposal, aligner, tokens)["fallback"] is None
    alone = choice_flags(DecodeConfig(mode="proposal"), proposal, None, tokens)
    assert alone["aligner_argmax"] is None and alone["proposal_argmax"].tolist() == [False, True]
    counts = ChoiceCounts()
    counts.add(flags, torch.tensor([True, True]))
    counts.add(flags, torch.tensor([False, True]))  # row 0 had ended: not counted
    assert (counts.steps, counts.fallback, counts.aligner_argmax, counts.proposal_argmax) == (3, 1, 3, 2)
    assert counts.rates() == {"token_steps": 3, "fallback_rate": 1 / 3, "follows_aligner_argmax": 1.0,
                              "follows_proposal_argmax": 2 / 3}
    assert ChoiceCounts().rates()["fallback_rate"] is None


@pytest.mark.parametrize("mode", list(MODES))
def test_no_row_is_ever_all_minus_inf(mode):
    proposal = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf], [1.0, 2.0, 3.0, 4.0]])
    aligner = torch.tensor([[-math.inf, 0.0, 0.0, 0.0], [-math.inf] * 4])  # disjoint / empty aligner support
    config = DecodeConfig(mode=mode, eos_priority=False)
    logits = apply_rule(proposal, aligner, config, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(logits).any(-1).all()
    assert not torch.isnan(logits.softmax(-1)).any()
    pick_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(0))


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(KeyError, match="par-kl.*Did you mean 'par-kl'"):
        get_mode("par_kl")
    with pytest.raises(ValueError, match="candidates"):
        DecodeConfig(mode="sir", candidates=0)


def test_missing_or_mismatched_logits_fail():
    with pytest.raises(ValueError, match="needs aligner logits"):
        apply_rule(PROPOSAL, None, DecodeConfig(mode="par"))
    with pytest.raises(ValueError, match="slice both"):
        apply_rule(PROPOSAL, torch.zeros(1, 6), DecodeConfig(mode="mds"))


def test_repetition_penalty_matches_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
