"""The RAM product's teacher-forced likelihood (amendlm.ram.likelihood): hand-computed values and the
agreement of the batched scorer with the models' own log-probs."""

import math

import pytest
import torch

from amendlm.ram.examples import response_logps
from amendlm.ram.likelihood import product_logps, product_response_nll
from amendlm.scoring import EncodedPair

from .conftest import make_tiny_llama


def test_product_logps_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.2, 0.4, 0.4]]).log() + 3.0  # a per-row constant in the aligner's logits changes nothing
    # w = 1: 0.5*0.2 = 0.25*0.4 = 0.1 for every token -> uniform
    assert torch.allclose(product_logps(p, q, 1.0).exp(), torch.full((1, 3), 1 / 3), atol=1e-6)
    # w = 1/2: 0.5*sqrt(0.2) : 0.25*sqrt(0.4) = sqrt(2) : 1  ->  sqrt(2) - 1, then (1 - (sqrt(2) - 1)) / 2 each
    expected = torch.tensor([[math.sqrt(2) - 1, 1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)]])
    assert torch.allclose(product_logps(p, q, 0.5).exp(), expected, atol=1e-6)
    # w = 0: the proposal alone
    assert torch.allclose(product_logps(p, q, 0.0).exp(), torch.tensor([[0.5, 0.25, 0.25]]), atol=1e-6)


@pytest.mark.parametrize("weight", [-0.5, float("inf"), float("nan")])
def test_product_logps_refuses_bad_weight(weight):
    with pytest.raises(ValueError, match="aligner_weight"):
        product_logps(torch.zeros(1, 3), torch.zeros(1, 3), weight)


def test_product_logps_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        product_logps(torch.zeros(1, 3), torch.zeros(1, 4), 1.0)


def _pairs():
    return [EncodedPair([1, 5, 9, 12, 7], 2), EncodedPair([1, 4, 4, 20, 21, 22, 3], 3), EncodedPair([1, 30, 2], 1)]


def test_product_response_nll_matches_the_models():
    torch.manual_seed(0)
    proposal, aligner = make_tiny_llama(40, seed=0), make_tiny_llama(40, seed=1)
    pairs = _pairs()
    got = product_response_nll(proposal, aligner, pairs, pad_id=0, weights=[0.0, 1.0], batch_size=2)
    # w = 0 is the proposal's own NLL of each response
    with torch.no_grad():
        logps, _ = response_logps(proposal.eval(), pairs, 0, "cpu")
    assert got[0.0] == pytest.approx(float(-logps.mean()), rel=1e-5)
    # w = 1 by hand, one response at a time, unpadded
    total = 0.0
    for pair in pairs:
        ids = torch.tensor([pair.ids])
        with torch.no_grad():
            lp = proposal(ids).logits.log_softmax(-1) + aligner(ids).logits.log_softmax(-1)
        lp = lp.log_softmax(-1)[0, :-1]
        targets = ids[0, 1:]
        scored = range(len(pair.ids) - 1 - pair.n_scored, len(pair.ids) - 1)
        total -= float(sum(lp[t, targets[t]] for t in scored))
    assert got[1.0] == pytest.approx(total / len(pairs), rel=1e-5)
    # batching changes nothing
    one = product_response_nll(proposal, aligner, pairs, pad_id=0, weights=[1.0], batch_size=1)
    assert one[1.0] == pytest.approx(got[1.0], rel=1e-5)


def test_product_response_nll_refuses_no_pairs():
    model = make_tiny_llama(40)
    with pytest.raises(ValueError, match="no responses"):
        product_response_nll(model, model, [], pad_id=0, weights=[1.0])
