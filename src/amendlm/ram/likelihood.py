"""How likely a RAM product of experts makes given responses, teacher-forced: a diagnostic of *why* a RAM
mode does or does not reach a fine-tune.

RAM decodes ``π(v) ∝ P_M(v | x, y_<t) · Q(v | x, y_<t)^w`` token by token (``mds``; ``w = 1 / T_e``, the
aligner's temperature, 1 in the paper's ``P_M · Q``; arXiv:2505.19700, Eq. 1 with the per-token
normalisation of its decoding).  The summed log-probability of a reference response under that per-token
product, for a few weights ``w`` (``w = 0`` is the proposal alone), says how much the aligner can move the
proposal towards the reference at all: if no ``w`` brings the references' NLL near a directly fine-tuned
model's, no decoding rule built on this aligner will match that fine-tune.
"""

from __future__ import annotations

from typing import Sequence

import torch

from amendlm.scoring import EncodedPair, collate, sequence_logps


def product_logps(proposal_logits: torch.Tensor, aligner_logits: torch.Tensor, aligner_weight: float) -> torch.Tensor:
    """Per-token normalised log-probs of the product ``P_M · Q^w``.

    ``log π = log_softmax(log_softmax(proposal_logits) + w · log_softmax(aligner_logits))`` (the
    distribution ``mds`` decodes with aligner temperature ``1 / w``; a per-row constant in either
    term cancels in the normalisation, so ``w · log Q`` and ``log softmax(a / T_e)`` give the same ``π``).

    Args:
        proposal_logits, aligner_logits: ``(..., vocab)`` logits over the same vocabulary.
        aligner_weight: ``w ≥ 0``; 0 returns the proposal's own log-probs.

    Returns:
        ``(..., vocab)`` fp32 natural-log probabilities (each row's ``exp`` sums to 1).

    Raises:
        ValueError: the shapes differ, or ``w`` is negative or not finite.
    """
    if proposal_logits.shape != aligner_logits.shape:
        raise ValueError(f"proposal and aligner logits differ in shape: {tuple(proposal_logits.shape)} "
                         f"vs {tuple(aligner_logits.shape)}")
    if not (aligner_weight >= 0 and aligner_weight != float("inf")):
        raise ValueError(f"aligner_weight must be a finite number >= 0, got {aligner_weight}")
    proposal_logps = proposal_logits.float().log_softmax(-1)
    if aligner_weight == 0:
        return proposal_logps
    return (proposal_logps + aligner_weight * aligner_logits.float().log_softmax(-1)).log_softmax(-1)


@torch.no_grad()
def product_response_nll(proposal, aligner, pairs: Sequence[EncodedPair], pad_id: int, weights: Sequence[float],
                         batch_size: int = 8, vocab_size: int | None = None,
                         dtype: torch.dtype = torch.float32) -> dict[float, float]:
    """Mean over ``pairs`` of each response's summed NLL under :func:`product_logps`, for every weight.

    Both models run once per batch (eval mode, left padding, the LM heads only on the response
    columns); every weight reuses those logits.

    Args:
        proposal, aligner: causal LMs sharing a tokenizer.
        pairs: ``prompt + response`` token ids, the response scored (:class:`amendlm.scoring.EncodedPair`).
        pad_id: the padding token id.
        weights: the aligner weights ``w`` (``1 / T_e``) to score.
        batch_size: pairs per forward.
        vocab_size: the shared vocabulary (logits sliced to it; ``None``: the proposal's logits' width,
            which must then equal the aligner's).
        dtype: autocast dtype of the forwards.

    Returns:
        ``{w: mean NLL}``, nats per response (summed over its tokens), in the order of ``weights``.

    Raises:
        ValueError: no pairs, or a weight is negative or not finite.
    """
    from amendlm.modeling import autocast, eval_mode

    if not pairs:
        raise ValueError("no responses to score")
    totals = {float(w): 0.0 for w in weights}
    device = next(proposal.parameters()).device
    with eval_mode(proposal), eval_mode(aligner):
        for start in range(0, len(pairs), batch_size):
            batch = list(pairs[start: start + batch_size])
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id, padding_side="left").items()}
            loss_mask = inputs.pop("loss_mask")
            keep = int(loss_mask.sum(-1).max()) + 1  # left padding: the scored tokens are the last columns
            with autocast(dtype, device):
                p = proposal(**inputs, use_cache=False, logits_to_keep=keep).logits
                a = aligner(**inputs, use_cache=False, logits_to_keep=keep).logits
            width = vocab_size or p.shape[-1]
            p, a = p[..., :width], a[..., :width]
            ids, mask = inputs["input_ids"][:, -keep:], loss_mask[:, -keep:]
            for w in totals:
                logps, _ = sequence_logps(product_logps(p, a, w), ids, mask)
                totals[w] -= float(logps.sum())
    return {w: total / len(pairs) for w, total in totals.items()}
