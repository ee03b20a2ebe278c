"""The unlearning losses against values computed by hand."""

import math

import pytest
import torch

from amendlm.unlearn import losses


def test_npo_at_reference_is_two_over_beta_ln2():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    for beta in (0.1, 1.0):
        for reduction in ("sequence", "token_mean", "batch_mean", "batch_sequence_mean"):
            loss = losses.npo_loss(logps, logps.clone(), beta, torch.tensor([2, 5, 1]), reduction)
            assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_per_sequence_hand_value():
    # log-ratios 2 and -4, beta 0.5: -(2/0.5) * mean(log sigmoid(-1), log sigmoid(2))
    policy, reference = torch.tensor([-1.0, -6.0]), torch.tensor([-3.0, -2.0])
    expected = -4.0 * (math.log(1 / (1 + math.e)) + math.log(1 / (1 + math.exp(-2.0)))) / 2
    assert losses.npo_loss(policy, reference, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_npo_batch_mean_uses_one_token_mean_ratio():
    # token-mean log-likelihood: policy (-1 - 6) / 4 = -1.75, reference (-3 - 2) / 4 = -1.25, ratio -0.5
    policy, reference, n = torch.tensor([-1.0, -6.0]), torch.tensor([-3.0, -2.0]), torch.tensor([1, 3])
    expected = -(2 / 0.1) * math.log(1 / (1 + math.exp(-0.1 * 0.5)))
    assert losses.npo_loss(policy, reference, 0.1, n, "batch_mean").item() == pytest.approx(expected, rel=1e-6)


def test_npo_token_mean_normalises_each_sequence_by_its_tokens():
    # per-token log-ratios: (-1 - -3) / 1 = 2 and (-6 - -2) / 3 = -4/3; beta 0.5:
    # -(2/0.5) * mean(log sigmoid(-0.5 * 2), log sigmoid(0.5 * 4/3))
    policy, reference, n = torch.tensor([-1.0, -6.0]), torch.tensor([-3.0, -2.0]), torch.tensor([1, 3])
    expected = -4.0 * (math.log(1 / (1 + math.e)) + math.log(1 / (1 + math.exp(-2 / 3)))) / 2
    assert losses.npo_loss(policy, reference, 0.5, n, "token_mean").item() == pytest.approx(expected, rel=1e-6)
    # at the reference: 0.5 per sequence (as for "sequence"), divided by its own token count
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    losses.npo_loss(policy, torch.tensor([-2.0, -3.0]), 0.1, torch.tensor([1, 4]), "token_mean").backward()
    assert policy.grad.tolist() == pytest.approx([0.5, 0.125])
    with pytest.raises(ValueError, match="n_tokens"):
        losses.npo_loss(policy, policy.detach(), 0.1, reduction="token_mean")


def test_npo_batch_sequence_mean_is_the_official_mean_of_sequence_means():
    # official lm_loss: token-mean NLL per sequence, then the mean over sequences, one ratio:
    # per-sequence token-mean log-ratios 2 and -4/3, their mean 1/3; beta 0.1
    policy, reference, n = torch.tensor([-1.0, -6.0]), torch.tensor([-3.0, -2.0]), torch.tensor([1, 3])
    expected = -(2 / 0.1) * math.log(1 / (1 + math.exp(0.1 / 3)))
    assert losses.npo_loss(policy, reference, 0.1, n, "batch_sequence_mean").item() == pytest.approx(expected, rel=1e-6)


def test_ce_per_sequence_mean_weighs_sequences_equally():
    logps, n = torch.tensor([-2.0, -9.0]), torch.tensor([1, 3])
    assert losses.ce_loss(logps, n).item() == pytest.approx(11 / 4)  # token-weighted
    assert losses.ce_loss(logps, n, "sequence").item() == pytest.approx((2 + 3) / 2)  # official lm_loss
    assert losses.gradient_ascent_loss(logps, n, "sequence").item() == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="valid: token, sequence"):
        losses.ce_loss(logps, n, "batch")


def test_npo_gradient_lowers_forget_likelihood():
    policy = torch.tensor([-2.0, -3.0], requires_grad=True)
    losses.npo_loss(policy, torch.tensor([-2.0, -3.0]), 0.1).backward()
    # d/dx -(2/b) log sigmoid(-b x) at x = 0 is (2/b) * b * 0.5 / batch = 0.5 per sequence
    assert policy.grad.tolist() == pytest.approx([0.5, 0.5])


def test_npo_rejects_bad_arguments():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="valid: sequence, token_mean, batch_mean, batch_sequence_mean"):
        losses.npo_loss(x, x, 0.1, reduction="mean")
    with pytest.raises(ValueError, match="n_tokens"):
        losses.npo_loss(x, x, 0.1, reduction="batch_mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.npo_loss(x, torch.zeros(3), 0.1)


def test_ce_is_token_weighted_mean_nll_and_ascent_is_its_negative():
    logps, n = torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])
    assert losses.ce_loss(logps, n).item() == pytest.approx(2.0)  # 8 nats / 4 tokens
    assert losses.gradient_ascent_loss(logps, n).item() == pytest.approx(-2.0)
    # GradDiff: -CE(forget) + w * CE(retain) = -2 + 0.5 * 3
    retain, n_retain = torch.tensor([-3.0]), torch.tensor([1])
    assert losses.grad_diff_loss(logps, n, retain, n_retain, 0.5).item() == pytest.approx(-0.5)


def test_kl_hand_value_and_padding_is_masked():
    # one scored position (t=1 predicts token 2): p_ref = (0.5, 0.5), p_theta = (0.8, 0.2)
    reference = torch.zeros(1, 4, 2)
    policy = torch.zeros(1, 4, 2)
    policy[0, 1] = torch.log(torch.tensor([0.8, 0.2]))
    mask = torch.tensor([[0, 0, 1, 0]])
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert losses.kl_loss(policy, reference, mask).item() == pytest.approx(expected, rel=1e-6)
    # garbage in padded / unscored positions changes nothing
    policy[0, 3] = torch.tensor([50.0, -50.0])
    policy[0, 0] = torch.tensor([-9.0, 9.0])
    assert losses.kl_loss(policy, reference, mask).item() == pytest.approx(expected, rel=1e-6)
    assert losses.kl_loss(reference, reference, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_averages_over_scored_tokens_of_all_rows():
    reference = torch.zeros(2, 3, 2)
    policy = torch.zeros(2, 3, 2)
    policy[1, 0] = torch.log(torch.tensor([0.8, 0.2]))
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])  # 2 + 1 scored tokens, one with KL > 0
    per = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert losses.kl_loss(policy, reference, mask).item() == pytest.approx(per / 3, rel=1e-6)
    # per sequence: row 0 has no KL, row 1 all of it; the token mean is their sum over the 3 tokens
    sums = losses.kl_sums(policy, reference, mask)
    assert sums.tolist() == pytest.approx([0.0, per], abs=1e-7)
    assert losses.kl_mean(sums, torch.tensor([2, 1])).item() == pytest.approx(per / 3, rel=1e-6)


def test_dpo_hand_values():
    zero = torch.zeros(2)
    assert losses.dpo_loss(zero, zero, zero, zero).item() == pytest.approx(math.log(2))
    # margin = (-1 - -2) - (-3 - -1) = 3, beta 0.5: -log sigmoid(1.5)
    loss = losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)
