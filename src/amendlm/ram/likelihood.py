"""How likely the token-level product that RAM's ``mds`` decodes makes given responses, teacher-forced: a
diagnostic of why a RAM mode does or does not reach a fine-tune.

``mds`` decodes ``π(v) ∝ P_M(v | x, y_<t) · Q(v | x, y_<t)^w`` token by token, i.e. the logits
``b / T_b + a / T_e`` of :func:`amendlm.product.product_logits` (eq. (1) there; RAM, arXiv:2505.19700,
Sec. 3, applied per token), with ``w = T_b / T_e``.  The summed log-probability of reference responses
under it, for a few weights ``w`` at ``T_b = 1`` (``w = 0``: the proposal alone), says how far this
aligner moves the proposal's distribution towards the references.  It is a likelihood, not a task
metric, and it covers ``mds`` only: ``par`` / ``par-kl`` restrict to the proposal's nucleus and ``sir``
is a random draw (:mod:`amendlm.product`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from amendlm.product import product_logits
from amendlm.ram.examples import left_padded_responses
from amendlm.scoring import EncodedPair, sequence_logps


@torch.no_grad()
def product_response_nll(proposal, aligner, pairs: Sequence[EncodedPair], pad_id: int, weights: Sequence[float],
                         batch_size: int = 8, vocab_size: int | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[float, float]:
    """Mean over ``pairs`` of each response's summed NLL under ``softmax(b + w · a)`` (:func:`amendlm.product.product_logits`
    at ``T_b = 1``, ``T_e = 1 / w``; ``w = 0``: ``softmax(b)``, the proposal alone), for every weight.

    Both models run once per batch (eval mode, left padding, the LM heads only on the response
    columns); every weight reuses those logits.

    Args:
        proposal, aligner: causal LMs sharing a tokenizer.
        pairs: ``prompt + response`` token ids, the response scored (:class:`amendlm.scoring.EncodedPair`).
        pad_id: the padding token id.
        weights: the aligner weights ``w`` (``1 / T_e``) to score.
        batch_size: pairs per forward.
        vocab_size: the shared vocabulary (logits sliced to it; ``None``: the proposal's logits' width).
        dtype: autocast dtype of the forwards.

    Returns:
        ``{w: mean NLL}``, nats per response (summed over its tokens), in the order of ``weights``.

    Raises:
        ValueError: no pairs, a weight is negative or not finite, or the aligner's logits are narrower
            than the vocabulary.
    """
    from amendlm.modeling import autocast, eval_mode

    if not pairs:
        raise ValueError("no responses to score")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"aligner weights must be finite and >= 0, got {bad}")
    totals = {float(w): 0.0 for w in weights}
    device = next(proposal.parameters()).device
    with eval_mode(proposal), eval_mode(aligner):
        for start in range(0, len(pairs), batch_size):
            batch = list(pairs[start: start + batch_size])
            inputs, keep, ids, mask = left_padded_responses(batch, pad_id, device)
            with autocast(dtype, device):
                p = proposal(**inputs, use_cache=False, logits_to_keep=keep).logits
                a = aligner(**inputs, use_cache=False, logits_to_keep=keep).logits
            width = vocab_size or p.shape[-1]
            for w in totals:
                logits = p[..., :width] if w == 0 else product_logits(p, a, width, 1.0, 1.0 / w)
                logps, _ = sequence_logps(logits, ids, mask)
                totals[w] -= float(logps.sum())
    return {w: total / len(pairs) for w, total in totals.items()}
