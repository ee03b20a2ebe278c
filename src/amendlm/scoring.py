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
* ``model`` is a causal LM or a proposal x aligner pair (:class:`amendlm.product.ProductLM`, the
  ``mds`` product distribution), which every function here takes as it takes a model: both models
  run once per batch on the same padded or packed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.modeling import autocast, eval_mode, pad_token_id, start_token_id


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

    The text ``prefix + continuation`` is tokenized as a whole (so a continuation is scored on
    exactly the tokens the full sentence has, whatever the tokenizer does with leading spaces),
    and split where the prefix's own tokens end.

    Raises:
        ValueError: a continuation has no tokens, or the prefix's tokens change when the
            continuation follows it (a token spans the boundary); names the pair's index.
    """
    start = start_token_id(tokenizer, start_token)
    prefixes = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    wholes = tokenizer([p + c for p, c in pairs], add_special_tokens=False)["input_ids"]
    encoded = []
    for index, (prefix_ids, whole_ids) in enumerate(zip(prefixes, wholes)):
        prefix, continuation = pairs[index]
        if whole_ids[: len(prefix_ids)] != prefix_ids:
            raise ValueError(
                f"pair {index}: a token spans the boundary between prefix {prefix!r} and continuation "
                f"{continuation!r}; move the boundary (e.g. put the space at the start of the continuation)"
            )
        n_scored = len(whole_ids) - len(prefix_ids)
        if n_scored == 0:
            raise ValueError(f"pair {index}: continuation {continuation!r} has no tokens to score")
        encoded.append(EncodedPair([start, *whole_ids], n_scored))
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


@dataclass(frozen=True)
class PackedGroup:
    """Several encoded pairs that share a token prefix, packed into one sequence.

    ``ids = common_prefix + suffix_1 + suffix_2 + ...``; each suffix attends to the common prefix
    and to itself only (a block "tree" mask) and continues its positions from the prefix, so every
    member gets exactly the logits it would get alone while the prefix is computed once.
    """

    ids: list[int]
    position_ids: list[int]
    segment: list[int]  # 0 = shared prefix, k = k-th member's suffix (1-based)
    targets: list[tuple[int, int, int]]  # (member index in the input, predicting position, token id)


def pack_group(members: Sequence[EncodedPair], member_indices: Sequence[int]) -> PackedGroup:
    """Pack encoded pairs sharing a prefix (see :class:`PackedGroup`); any group of 1+ pairs works."""
    common = 0
    shortest = min(len(m.ids) for m in members)
    while common < shortest - 1 and all(m.ids[common] == members[0].ids[common] for m in members):
        common += 1
    ids, positions, segment = list(members[0].ids[:common]), list(range(common)), [0] * common
    targets: list[tuple[int, int, int]] = []
    for number, (member, index) in enumerate(zip(members, member_indices), start=1):
        offset = len(ids) - common  # packed index of original token k >= common is k + offset
        ids.extend(member.ids[common:])
        positions.extend(range(common, len(member.ids)))
        segment.extend([number] * (len(member.ids) - common))
        for k in range(len(member.ids) - member.n_scored, len(member.ids)):
            predictor = k - 1 if k - 1 < common else k - 1 + offset
            targets.append((index, predictor, member.ids[k]))
    return PackedGroup(ids, positions, segment, targets)


def collate_packed(groups: Sequence[PackedGroup], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-pad packed groups into model inputs.

    Returns:
        ``input_ids`` and ``position_ids``: ``(batch, seq_len)`` long tensors; ``attention_mask``:
        an *additive* float mask ``(batch, 1, seq_len, seq_len)`` of ``dtype``, 0 where a query may
        attend and the dtype's minimum elsewhere (transformers' eager attention adds a 4-D mask
        to the scores and sdpa accepts the same, so both compute the same thing).

    A query attends to earlier keys of the shared prefix or of its own segment.  Padding
    positions attend only to themselves, so no row is fully masked (which would give NaN).
    """
    width = max(len(g.ids) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)
    for row, group in enumerate(groups):
        n = len(group.ids)
        input_ids[row, :n] = torch.tensor(group.ids)
        position_ids[row, :n] = torch.tensor(group.position_ids)
        segment[row, :n] = torch.tensor(group.segment)
    query, key = segment.unsqueeze(-1), segment.unsqueeze(-2)  # (batch, seq_len, 1), (batch, 1, seq_len)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    real = (query >= 0) & (key >= 0)
    allowed = causal & real & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves only
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": additive.unsqueeze(1)}


PACKING_ATTENTION = ("eager", "sdpa")


def check_packing_support(model) -> None:
    """Raise if the model's attention kernel ignores custom 4-D masks (needed by :func:`score_grouped`).

    A proposal x aligner pair (:class:`amendlm.product.ProductLM`) is checked model by model.

    Raises:
        ValueError: e.g. flash-attention; the message says to pass ``--no-share-prefix``.
    """
    for part in getattr(model, "component_models", (model,)):
        implementation = getattr(getattr(part, "config", None), "_attn_implementation", None)
        if implementation is not None and implementation not in PACKING_ATTENTION:
            raise ValueError(
                f"shared-prefix scoring needs {' or '.join(PACKING_ATTENTION)} attention, the model uses "
                f"'{implementation}'; pass --no-share-prefix (EvalConfig(share_prefix=False))"
            )


@torch.inference_mode()
def score_grouped(
    model,
    encoded: Sequence[EncodedPair],
    groups: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    progress: str | None = None,
) -> Scores:
    """Like :func:`score_encoded`, computing each group's shared token prefix once.

    ``groups`` partitions ``range(len(encoded))`` (e.g. the three candidates of a StereoSet
    cluster); ``batch_size`` counts groups.  Needs a model that accepts a 4-D additive attention
    mask and explicit position ids (transformers models with eager or sdpa attention); results
    equal :func:`score_encoded` up to float rounding.

    Raises:
        ValueError: ``groups`` is not a partition of the encoded indices, or the model's attention
            kernel cannot take a custom mask (:func:`check_packing_support`).
    """
    from tqdm.auto import tqdm

    if sorted(i for g in groups for i in g) != list(range(len(encoded))):
        raise ValueError("groups must contain every encoded index exactly once")
    check_packing_support(model)
    device = next(model.parameters()).device
    packed = [pack_group([encoded[i] for i in g], g) for g in groups]
    logp_sum = torch.zeros(len(encoded), dtype=torch.float32)
    n_tokens = torch.zeros(len(encoded), dtype=torch.long)
    with eval_mode(model):
        for order in tqdm(length_buckets([len(p.ids) for p in packed], batch_size), desc=progress,
                          disable=progress is None, unit="batch", leave=False):
            _score_packed_batch(model, [packed[i] for i in order], pad_id, dtype, device, logp_sum, n_tokens)
    return Scores(logp_sum, n_tokens)


def _score_packed_batch(model, batch: Sequence[PackedGroup], pad_id: int, dtype: torch.dtype, device: torch.device,
                        logp_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:
    """Score one batch of packed groups, adding each member's log-probs and token counts in place."""
    mask_dtype = next(model.parameters()).dtype
    inputs = {k: v.to(device) for k, v in collate_packed(batch, pad_id, mask_dtype).items()}
    with autocast(dtype, device):
        logits = model(**inputs, use_cache=False).logits
    rows = torch.tensor([row for row, g in enumerate(batch) for _ in g.targets])
    cols = torch.tensor([t[1] for g in batch for t in g.targets])
    tokens = torch.tensor([t[2] for g in batch for t in g.targets], device=device)
    members = torch.tensor([t[0] for g in batch for t in g.targets])
    per_token = token_logps(logits[rows.to(device), cols.to(device)], tokens).cpu()
    logp_sum.index_add_(0, members, per_token)
    n_tokens.index_add_(0, members, torch.ones_like(members))


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
    """Score encoded pairs with length-bucketed batches (see :func:`score_pairs`), in eval mode (:func:`amendlm.modeling.eval_mode`)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    logp_sum = torch.zeros(len(encoded), dtype=torch.float32)
    n_tokens = torch.zeros(len(encoded), dtype=torch.long)
    batches = length_buckets([len(e.ids) for e in encoded], batch_size)
    with eval_mode(model):
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
    groups: Sequence[Sequence[int]] | None = None,
) -> Scores:
    """Log-probabilities of continuations given prefixes, batched by length.

    Args:
        model: a causal LM (``transformers`` or PEFT-wrapped) returning ``.logits``, or a
            :class:`amendlm.product.ProductLM` (scores under ``softmax(b/T_b + a/T_e)``).
        tokenizer: its tokenizer (a pair's shared one).
        pairs: ``(prefix, continuation)`` strings; ``prefix`` may be ``""`` (score a whole sentence).
        batch_size: sequences per forward pass.
        dtype: ``torch.float32`` (exact) or ``torch.bfloat16`` (autocast; faster, ~1e-2 noise).
        start_token: see :func:`amendlm.modeling.start_token_id`.
        padding_side: ``"right"`` or ``"left"``; results are identical up to float rounding.
        progress: a tqdm description, or ``None`` for no bar.
        groups: optional partition of the pair indices into groups that share a prefix (e.g. the
            candidates of one StereoSet context); each group's common tokens are computed once
            (:func:`score_grouped`, ``batch_size`` then counts groups).  Same results.

    Returns:
        :class:`Scores` in input order: summed log-prob and token count of each continuation.

    The model runs in eval mode (dropout off) and gets its own train/eval modes back afterwards,
    also on an exception (:func:`amendlm.modeling.eval_mode`).
    """
    pad_id = pad_token_id(tokenizer, start_token)
    encoded = encode_pairs(tokenizer, pairs, start_token)
    if groups is not None:
        return score_grouped(model, encoded, groups, pad_id, batch_size, dtype, progress)
    return score_encoded(model, encoded, pad_id, batch_size, dtype, padding_side, progress)
