"""RAM's training losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from amendlm.ram.losses import LossConfig, dpo_loss, get_loss, residual_loss


def test_residual_loss_per_sequence_by_hand():
    # targets: log Q(y|x) = -4, -6 (summed over tokens); samples: log Q(y'|x) = -10, -20
    target = torch.tensor([-4.0, -6.0])
    sample = torch.tensor([-10.0, -20.0])
    loss, parts = residual_loss(target, sample, LossConfig(alpha=0.1))
    # L = -mean(-4, -6) + 0.1 * mean(-10, -20) = 5 - 1.5 = 3.5
    assert loss.item() == pytest.approx(3.5)
    assert parts["nll"].item() == pytest.approx(5.0)
    assert parts["sample_logp"].item() == pytest.approx(-15.0)


def test_residual_loss_per_token_by_hand():
    target, target_n = torch.tensor([-4.0, -6.0]), torch.tensor([2, 3])  # per token -2, -2
    sample, sample_n = torch.tensor([-10.0, -20.0]), torch.tensor([5, 4])  # per token -2, -5
    loss, _ = residual_loss(target, sample, LossConfig(alpha=0.5, per_token=True), target_n, sample_n)
    assert loss.item() == pytest.approx(2.0 + 0.5 * -3.5)
    with pytest.raises(ValueError, match="token counts"):
        residual_loss(target, sample, LossConfig(per_token=True))


def test_alpha_zero_is_sft_and_gradient_pushes_samples_down():
    target = torch.tensor([-4.0], requires_grad=True)
    sample = torch.tensor([-10.0], requires_grad=True)
    loss, _ = residual_loss(target, sample, LossConfig(alpha=1e-4))
    loss.backward()
    assert target.grad.item() == pytest.approx(-1.0)  # raise log Q(y|x)
    assert sample.grad.item() == pytest.approx(1e-4)  # lower log Q(y'|x), weighted by alpha
    assert residual_loss(target, sample, LossConfig(alpha=0.0))[0].item() == pytest.approx(4.0)


def test_reference_free_dpo_by_hand():
    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])  # margins +1, -1
    loss, parts = dpo_loss(chosen, rejected, LossConfig(name="dpo", beta=1.0))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2  # -log sigmoid(+-1)
    assert loss.item() == pytest.approx(expected)
    assert parts["accuracy"].item() == pytest.approx(0.5)
    assert parts["margin"].item() == pytest.approx(0.0)
    equal = dpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), LossConfig(name="dpo", beta=0.1))[0]
    assert equal.item() == pytest.approx(math.log(2.0))  # no preference yet: ln 2


def test_dpo_pairs_must_align_and_names_are_checked():
    with pytest.raises(ValueError, match="pair up"):
        dpo_loss(torch.zeros(2), torch.zeros(3), LossConfig(name="dpo"))
    with pytest.raises(KeyError, match="Did you mean 'dpo'"):
        get_loss("dpp")
    with pytest.raises(ValueError, match="alpha"):
        LossConfig(alpha=-1.0)


def test_token_kl_by_hand_and_masked():
    from amendlm.ram.losses import token_kl

    teacher = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]).log()  # (1, 2, 3); a zero-probability token adds 0
    student = torch.tensor([[[0.25, 0.75, 0.0], [0.1, 0.2, 0.7]]]).log()
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438 nats
    second = math.log(1.0 / 0.1)
    assert token_kl(teacher, student, torch.tensor([[True, False]])).item() == pytest.approx(first, rel=1e-6)
    assert token_kl(teacher, student, torch.tensor([[True, True]])).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert token_kl(teacher, teacher, torch.tensor([[True, True]])).item() == 0.0
    with pytest.raises(ValueError, match="keeps no position"):
        token_kl(teacher, student, torch.tensor([[False, False]]))
