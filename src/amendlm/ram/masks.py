"""Which tokens a decoding rule may pick: top-k and top-p (nucleus) masks over ``(batch, vocab)`` logits.

Pure tensor functions, used by every rule of :mod:`amendlm.ram.decoding` and by the server's sampler.

:func:`top_p_mask` decides from the sorted distribution as a full sort does, but sorts only a row's
most likely tokens: a nucleus is usually far smaller than the vocabulary, and on a CPU a full sort of a
50k-token row per decoding step costs a noticeable share of a small aligner's step.  A ``torch.topk``
of a few tokens costs a small fraction of a full sort.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

TOP_P_CANDIDATES = (64, 512, 4096)
"""Top-k sizes :func:`top_p_mask` tries in turn, each on the rows the previous one left undecided,
before sorting the rest in full."""


def masked(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logits`` where ``keep``, ``-inf`` elsewhere (fp32)."""
    return logits.float().masked_fill(~keep, NEG_INF)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``(batch, vocab)`` bool keeping each row's ``k`` largest logits (all when ``k`` is 0 or >= vocab)."""
    if k <= 0 or k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    return logits >= threshold


def _keep_sorted(sorted_logits: torch.Tensor, probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """On rows sorted most likely first: ``(keep, settled)``; ``keep`` ``(rows, k)`` bool, the tokens whose
    more likely tokens hold less than ``top_p`` (at least the first); ``settled`` ``(rows,)`` bool, the
    ``k`` tokens hold ``top_p`` or more, so every token after them is out."""
    cumulative = probs.cumsum(-1)
    keep = (cumulative - probs < top_p) & torch.isfinite(sorted_logits)
    keep[:, 0] = True
    return keep, cumulative[:, -1] >= top_p


def _top_p_mask_sorted(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """:func:`top_p_mask` by one full sort of every row (fp32 ``logits``)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    keep, _ = _keep_sorted(sorted_logits, sorted_logits.softmax(-1).nan_to_num(0.0), top_p)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus of each row: the smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is kept when the probability of the tokens sorted before it is below ``top_p``
    (``p = softmax(logits)``, natural units, fp32).  Rather than sorting the whole row, the row's
    ``k`` most likely tokens are sorted (``torch.topk``, ``k`` in :data:`TOP_P_CANDIDATES`, each
    tried on the rows the previous one left); they settle the row once they hold ``top_p``.  Rows
    left after the last ``k``, and all rows when ``top_p`` is 1 or the tensor is not on the CPU (an
    accelerator sorts a row fast, and needs no synchronisation to), are sorted in full.  The result
    equals a full sort's up to the rounding of the softmax's fp32 sum, taken over the row in another
    order (the cut moves only where the mass before a token is within that rounding of ``top_p``),
    and the order among exactly tied logits, which a sort leaves unspecified too.

    Args:
        logits: ``(batch, vocab)``; ``-inf`` entries have probability 0 and are never kept
            (unless a row is all ``-inf``, where the argmax is kept).
        top_p: in (0, 1]; 1.0 keeps every finite token.

    Returns:
        ``(batch, vocab)`` bool; every row keeps at least its most likely token.
    """
    logits = logits.float()
    batch, vocab = logits.shape
    if top_p >= 1.0 or batch == 0 or logits.device.type != "cpu":  # an accelerator sorts fast, without a sync
        return _top_p_mask_sorted(logits, top_p)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    probs = logits.softmax(-1)  # the values a sorted row's softmax has, up to the sum's rounding
    pending = torch.arange(batch, device=logits.device)  # rows not settled yet
    for k in TOP_P_CANDIDATES:
        if k >= vocab:
            break
        every = len(pending) == batch
        top_logits, order = (logits if every else logits[pending]).topk(k, dim=-1)  # sorted, most likely first
        top_probs = (probs if every else probs[pending]).gather(-1, order).nan_to_num(0.0)
        keep_top, settled = _keep_sorted(top_logits, top_probs, top_p)
        keep[pending[settled].unsqueeze(-1), order[settled]] = keep_top[settled]
        pending = pending[~settled]
        if len(pending) == 0:
            return keep
    keep[pending] = _top_p_mask_sorted(logits[pending], top_p)
    return keep
