"""The teacher-forced likelihood of the token-level product `mds` decodes (amendlm.ram.likelihood): the batched
scorer against each model's own log-probs and against the product computed by hand, one response at a time."""

import pytest
import torch

from amendlm.ram.examples import response_logps
from amendlm.ram.likelihood import product_response_nll
from amendlm.scoring import EncodedPair

from .conftest import make_tiny_llama


def _pairs():
    return [EncodedPair([1, 5, 9, 12, 7], 2), EncodedPair([1, 4, 4, 20, 21, 22, 3], 3), EncodedPair([1, 30, 2], 1)]


def test_product_response_nll_matches_the_models():
    torch.manual_seed(0)
    proposal, aligner = make_tiny_llama(40, seed=0), make_tiny_llama(40, seed=1)
    pairs = _pairs()
    got = product_response_nll(proposal, aligner, pairs, pad_id=0, weights=[0.0, 0.5, 1.0], batch_size=2)
    # w = 0 is the proposal's own NLL of each response
    with torch.no_grad():
        logps, _ = response_logps(proposal.eval(), pairs, 0, "cpu")
    assert got[0.0] == pytest.approx(float(-logps.mean()), rel=1e-5)
    # w > 0 by hand: log softmax(log P + w log Q), one response at a time, unpadded
    for w in (0.5, 1.0):
        total = 0.0
        for pair in pairs:
            ids = torch.tensor([pair.ids])
            with torch.no_grad():
                lp = (proposal(ids).logits.log_softmax(-1) + w * aligner(ids).logits.log_softmax(-1)).log_softmax(-1)[0]
            scored = range(len(pair.ids) - 1 - pair.n_scored, len(pair.ids) - 1)  # position t predicts token t + 1
            total -= float(sum(lp[t, pair.ids[t + 1]] for t in scored))
        assert got[w] == pytest.approx(total / len(pairs), rel=1e-5)
    assert got[0.5] != pytest.approx(got[1.0], rel=1e-3)
    # batching changes nothing
    one = product_response_nll(proposal, aligner, pairs, pad_id=0, weights=[1.0], batch_size=1)
    assert one[1.0] == pytest.approx(got[1.0], rel=1e-5)


def test_product_response_nll_refuses_no_pairs():
    model = make_tiny_llama(40)
    with pytest.raises(ValueError, match="no responses"):
        product_response_nll(model, model, [], pad_id=0, weights=[1.0])


@pytest.mark.parametrize("weight", [-0.5, float("inf"), float("nan")])
def test_product_response_nll_refuses_a_bad_weight_before_any_forward(weight):
    class Exploding(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("a model ran")

    with pytest.raises(ValueError, match="aligner weights"):
        product_response_nll(Exploding(), Exploding(), _pairs(), pad_id=0, weights=[1.0, weight])
