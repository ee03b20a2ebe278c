"""Batched sequence log-probabilities: the hot path of every benchmark, loss and decoder.

Conventions (natural log throughout):

* A scored example is a ``(prefix, continuation)`` pair of strings.  The model sees
  ``[start] + tokens(prefix) + tokens(continuation)``; only continuation tokens are scored.
  ``start`` is the tokenizer's BOS if it has one, else EOS (overridable), so a sentence scored
  with an empty prefix has every one of its tokens scored, the first one conditioned on ``start``.
* Prefix and continuation are tokenized separately (``add_special_tokens=False``); a
  continuation that follows a word must carry its own leading space (``" He left."``).
* Padding never contributes: padded positions are masked out of the scored tokens and,
  with left padding, position ids are rebuilt from the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.modeling import autocast, start_token_id


def token_logps(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token under its logits row.

    Args:
        logits: ``(..., vocab)`` unnormalised scores; any float dtype (computed in fp32).
        target_ids: ``(...)`` token ids, same leading shape as ``logits``.

    Returns:
        ``(...)`` fp32 natural-log probabilities ``log softmax(logits)[target]``.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, target_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the masked tokens of each sequence (the shift is done here).

    Args:
        logits: ``(batch, seq_len, vocab)`` model outputs; ``logits[:, t]`` predicts ``input_ids[:, t + 1]``.
        input_ids: ``(batch, seq_len)`` the tokens fed to the model.
        loss_mask: ``(batch, seq_len)`` 1 where ``input_ids[:, t]`` is a scored token, 0 for the
            prefix, start token and padding.  Position 0 is never scored (nothing predicts it).

    Returns:
        ``(logp_sum, n_tokens)``: two ``(batch,)`` tensors, fp32 sum of natural-log probabilities of
        the scored tokens and their count.  Per-token mean = ``logp_sum / n_tokens``.
    """
    shifted_mask = loss_mask[:, 1:].bool()
    per_token = torch.zeros(shifted_mask.shape, dtype=torch.float32, device=logits.device)
    # only rows that are scored go through log-softmax (the vocab axis dominates the cost)
    per_token[shifted_mask] = token_logps(logits[:, :-1][shifted_mask], input_ids[:, 1:][shifted_mask])
    return per_token.sum(-1), shifted_mask.sum(-1)


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one scored example: ``ids = [start] + prefix + continuation``."""

    ids: list[int]
    n_scored: int  # the last n_scored ids are the continuation


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], start_token: str | int | None = None
) -> list[EncodedPair]:
    """Tokenize ``(prefix, continuation)`` pairs for :func:`score_encoded`.

    Raises:
        ValueError: a continuation has no tokens (names the pair's index).
    """
    start = start_token_id(tokenizer, start_token)
    prefixes = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    continuations = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for index, (prefix_ids, continuation_ids) in enumerate(zip(prefixes, continuations)):
        if not continuation_ids:
            raise ValueError(f"pair {index}: continuation {pairs[index][1]!r} has no tokens to score")
        encoded.append(EncodedPair([start, *prefix_ids, *continuation_ids], len(continuation_ids)))
    return encoded


def collate(
    batch: Sequence[EncodedPair], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded pairs into model inputs.

    Returns:
        dict of ``(batch, seq_len)`` long tensors ``input_ids``, ``attention_mask``,
        ``position_ids`` (0 at each row's first real token, so left padding changes nothing)
        and ``loss_mask`` (1 on continuation tokens).

    Raises:
        ValueError: ``padding_side`` is not ``"left"`` or ``"right"``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(item.ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.ids)
        start = 0 if padding_side == "right" else width - n
        input_ids[row, start : start + n] = torch.tensor(item.ids)
        attention_mask[row, start : start + n] = 1
        loss_mask[row, start + n - item.n_scored : start + n] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
    }


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length (sorted, longest first) to minimise padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Scores:
    """Per-example results of :func:`score_pairs`, in input order.

    ``logp_sum``: ``(n,)`` fp32 summed natural-log probability of each continuation;
    ``n_tokens``: ``(n,)`` number of continuation tokens.
    """

    logp_sum: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def logp_mean(self) -> torch.Tensor:
        """``(n,)`` mean per-token log-prob (StereoSet's sentence score)."""
        return self.logp_sum / self.n_tokens


@torch.inference_mode()
def score_encoded(
    model,
    encoded: Sequence[EncodedPair],
    pad_id: int,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    padding_side: str = "right",
    progress: str | None = None,
) -> Scores:
    """Score encoded pairs with length-bucketed batches (see :func:`score_pairs`)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    logp_sum = torch.zeros(len(encoded), dtype=torch.float32)
    n_tokens = torch.zeros(len(encoded), dtype=torch.long)
    batches = length_buckets([len(e.ids) for e in encoded], batch_size)
    for indices in tqdm(batches, desc=progress, disable=progress is None, unit="batch", leave=False):
        inputs = {k: v.to(device) for k, v in collate([encoded[i] for i in indices], pad_id, padding_side).items()}
        loss_mask = inputs.pop("loss_mask")
        with autocast(dtype, device):
            logits = model(**inputs, use_cache=False).logits
        sums, counts = sequence_logps(logits, inputs["input_ids"], loss_mask)
        index = torch.tensor(indices)
        logp_sum[index] = sums.cpu()
        n_tokens[index] = counts.cpu()
    return Scores(logp_sum, n_tokens)


def score_pairs(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    start_token: str | int | None = None,
    padding_side: str = "right",
    progress: str | None = None,
) -> Scores:
    """Log-probabilities of continuations given prefixes, batched by length.

    Args:
        model: a causal LM (``transformers`` or PEFT-wrapped) returning ``.logits``.
        tokenizer: its tokenizer.
        pairs: ``(prefix, continuation)`` strings; ``prefix`` may be ``""`` (score a whole sentence).
        batch_size: sequences per forward pass.
        dtype: ``torch.float32`` (exact) or ``torch.bfloat16`` (autocast; faster, ~1e-2 noise).
        start_token: see :func:`amendlm.modeling.start_token_id`.
        padding_side: ``"right"`` or ``"left"``; results are identical up to float rounding.
        progress: a tqdm description, or ``None`` for no bar.

    Returns:
        :class:`Scores` in input order: summed log-prob and token count of each continuation.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token_id(tokenizer, start_token)
    encoded = encode_pairs(tokenizer, pairs, start_token)
    return score_encoded(model, encoded, pad_id, batch_size, dtype, padding_side, progress)
