"""Packed rows for the training forward: the examples of a step in a few long rows.

A step of BiasUnlearn runs dozens of short StereoSet sequences (about 8-25 tokens) beside
64-token text chunks; padded to the longest of each batch, most of the matmul work is padding.
Packing lays the examples end to end in rows of about :data:`ROW_TOKENS` tokens instead and
keeps them apart with a block-diagonal causal 4-D attention mask and per-example position ids,
so every example gets the logits it would get alone (up to float rounding), with no padding but
the tail of each row.  :func:`amendlm.scoring.collate_packed` does the same for the scorer.

Examples may come in *groups* that share a token prefix (a DPO pair: the chosen and the
rejected continuation of one context): the group's common prefix is laid down once and each
member's own tokens attend to it and to themselves only (a tree mask, as
:func:`amendlm.scoring.pack_group`), so the prefix is computed once for both members.  The
gradient is the same (the prefix's hidden states feed both members' losses); under dropout
the two members share one dropout mask on the prefix.

Everything downstream works on the *scored* positions only, in a canonical order that does not
depend on the layout: example by example (input order), token by token.  :class:`PackedLayout`
holds the model inputs and, per scored token, the (row, column) that predicts it, the target
token id and the example it belongs to.  A padded batch (:func:`padded_layout`) gives the same
canonical order, so the losses of both layouts agree up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.scoring import PACKING_ATTENTION, EncodedPair

ROW_TOKENS = 256
"""Token budget of a packed row (a longer example gets a row of its own length).

The linear layers cost the same for any row length (they see ``rows * width`` tokens), but the
attention scores of a row cost ``width**2`` whatever the block mask hides: at 256 tokens that is
about 8 % of a 135M model's per-token matmul work (4 * 256 * d_model per layer against
2 * params / layer), while shorter rows leave more padding in the last row."""


@dataclass(frozen=True)
class PackedLayout:
    """Model inputs for a list of examples and where each scored token is predicted.

    Attributes:
        inputs: ``input_ids`` and ``position_ids`` ``(rows, width)`` long tensors and
            ``attention_mask``, either ``(rows, width)`` 0/1 (padded layout) or an additive float
            ``(rows, 1, width, width)`` mask (packed layout: 0 where a query may attend, the
            dtype's minimum elsewhere).
        rows, cols: ``(n_scored,)`` long; ``logits[rows[j], cols[j]]`` predicts scored token ``j``.
        targets: ``(n_scored,)`` long, the token id of scored token ``j``.
        owner: ``(n_scored,)`` long, the example (index into the input list) token ``j`` belongs to.
        n_examples: number of examples.

    The scored tokens are in canonical order: by example, then by position in the example.
    """

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    n_examples: int

    def to(self, device: torch.device | str) -> "PackedLayout":
        """The same layout with every tensor on ``device``."""
        return PackedLayout({k: v.to(device) for k, v in self.inputs.items()}, self.rows.to(device), self.cols.to(device),
                            self.targets.to(device), self.owner.to(device), self.n_examples)

    def scored(self, logits: torch.Tensor) -> torch.Tensor:
        """``(n_scored, vocab)``: the logits rows that predict the scored tokens (canonical order).

        Args:
            logits: ``(rows, width, vocab)`` model outputs on :attr:`inputs`.
        """
        return logits[self.rows, self.cols]

    def per_example(self, values: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """``(n_examples,)`` fp32 sums of per-token ``values`` over each example's tokens.

        Args:
            values: one value per scored token of ``tokens``: ``(n_scored,)`` by default, or the
                length of a :meth:`token_slice`.
            tokens: which scored tokens ``values`` belong to (canonical positions).

        Returns:
            sums that keep ``values``' graph; 0 for an example without (selected) scored tokens.
        """
        zeros = torch.zeros(self.n_examples, dtype=torch.float32, device=values.device)
        return zeros.index_add(0, self.owner[tokens], values.float())

    def n_tokens(self) -> torch.Tensor:
        """``(n_examples,)`` long: scored tokens per example."""
        return torch.bincount(self.owner, minlength=self.n_examples)

    def token_slice(self, begin: int, end: int) -> slice:
        """The canonical positions of the scored tokens of examples ``begin .. end - 1``."""
        return slice(int((self.owner < begin).sum()), int((self.owner < end).sum()))


def scored_positions(item: EncodedPair) -> list[int]:
    """Positions ``k`` of ``item.ids`` whose token counts in the loss (predicted by position ``k - 1``).

    The last ``n_scored`` tokens (the continuation), less those a
    :class:`~amendlm.unlearn.streams.MaskedPair` does not keep; position 0 never counts (nothing
    predicts it), as in :func:`amendlm.scoring.sequence_logps`.
    """
    begin = len(item.ids) - item.n_scored
    kept = getattr(item, "kept", ()) or (True,) * item.n_scored
    return [begin + i for i, keep in enumerate(kept) if keep and begin + i >= 1]


def _common_prefix(members: Sequence[EncodedPair]) -> int:
    """Tokens every member starts with, leaving each member at least one token of its own (0 for one member)."""
    if len(members) < 2:
        return 0
    shortest, first = min(len(m.ids) for m in members), members[0].ids
    common = 0
    while common < shortest - 1 and all(m.ids[common] == first[common] for m in members):
        common += 1
    return common


def pack_examples(examples: Sequence[EncodedPair], pad_id: int, groups: Sequence[Sequence[int]] | None = None,
                  row_tokens: int = ROW_TOKENS, mask_dtype: torch.dtype = torch.float32) -> PackedLayout:
    """Lay ``examples`` out in packed rows (first-fit decreasing, at most ``max(row_tokens, longest group)`` tokens a row).

    Args:
        examples: the encoded examples (:class:`~amendlm.scoring.EncodedPair` or
            :class:`~amendlm.unlearn.streams.MaskedPair`).
        pad_id: token id of the padding at the end of rows (never attended to by a real token).
        groups: a partition of ``range(len(examples))`` into groups sharing their common token
            prefix (see the module docstring); ``None``: every example alone.
        row_tokens: the row budget (:data:`ROW_TOKENS`).
        mask_dtype: dtype of the additive mask (the model's parameter dtype).

    Returns:
        a :class:`PackedLayout` with a ``(rows, 1, width, width)`` additive mask: a query attends to
        earlier keys of its own example, and of its group's shared prefix; each padding position
        attends to itself only (no fully masked row, which would give NaN).

    Raises:
        ValueError: ``examples`` is empty, ``row_tokens < 1``, or ``groups`` is not a partition.
    """
    if not examples:
        raise ValueError("nothing to pack: no examples")
    if row_tokens < 1:
        raise ValueError(f"row_tokens must be >= 1, got {row_tokens}")
    groups = [[i] for i in range(len(examples))] if groups is None else [list(g) for g in groups]
    if sorted(i for g in groups for i in g) != list(range(len(examples))) or any(not g for g in groups):
        raise ValueError("groups must contain every example index exactly once")
    # one group = its shared prefix once, then each member's own tokens
    lengths = []
    for group in groups:
        common = _common_prefix([examples[i] for i in group])
        lengths.append(common + sum(len(examples[i].ids) - common for i in group))
    capacity = max(row_tokens, max(lengths))
    rows: list[list[int]] = []  # group indices per row
    free: list[int] = []
    for g in sorted(range(len(groups)), key=lambda g: (-lengths[g], g)):
        row = next((r for r, room in enumerate(free) if room >= lengths[g]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(g)
        free[row] -= lengths[g]
    width = max(capacity - room for room in free)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    group_of = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 = padding
    member_of = torch.zeros((len(rows), width), dtype=torch.long)  # 0 = a group's shared prefix
    # example -> (row, packed index of its group's first token, packed index of its token 0 if unshared, common prefix)
    where: dict[int, tuple[int, int, int, int]] = {}
    for r, row_groups in enumerate(rows):
        cursor = 0
        for g in row_groups:
            members = [examples[i] for i in groups[g]]
            common, group_start = _common_prefix(members), cursor
            span = slice(cursor, cursor + common)
            input_ids[r, span] = torch.tensor(members[0].ids[:common], dtype=torch.long)
            position_ids[r, span] = torch.arange(common)
            group_of[r, span] = g
            cursor += common
            for number, (index, member) in enumerate(zip(groups[g], members), start=1):
                own = len(member.ids) - common
                span = slice(cursor, cursor + own)
                input_ids[r, span] = torch.tensor(member.ids[common:], dtype=torch.long)
                position_ids[r, span] = torch.arange(common, len(member.ids))
                group_of[r, span], member_of[r, span] = g, number
                where[index] = (r, group_start, cursor - common, common)
                cursor += own
    query_group, key_group = group_of.unsqueeze(-1), group_of.unsqueeze(-2)  # (rows, width, 1), (rows, 1, width)
    query_member, key_member = member_of.unsqueeze(-1), member_of.unsqueeze(-2)
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (query_group == key_group) & (key_group >= 0)
    allowed &= (key_member == 0) | (key_member == query_member)
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    scored_rows, cols, targets, owner = [], [], [], []
    for index, item in enumerate(examples):
        r, group_start, offset, common = where[index]
        for k in scored_positions(item):  # token k is predicted by position k - 1, shared or the member's own
            cols.append(group_start + k - 1 if k - 1 < common else offset + k - 1)
            scored_rows.append(r)
            targets.append(item.ids[k])
            owner.append(index)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask.unsqueeze(1)}
    return _layout(inputs, scored_rows, cols, targets, owner, len(examples))


def padded_layout(examples: Sequence[EncodedPair], pad_id: int) -> PackedLayout:
    """The usual right-padded batch (one example a row, ``(rows, width)`` 0/1 attention mask) as a
    :class:`PackedLayout`: the fallback for attention kernels that take no custom mask."""
    if not examples:
        raise ValueError("nothing to lay out: no examples")
    width = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    scored_rows, cols, targets, owner = [], [], [], []
    for index, item in enumerate(examples):
        input_ids[index, : len(item.ids)] = torch.tensor(item.ids, dtype=torch.long)
        attention_mask[index, : len(item.ids)] = 1
        for k in scored_positions(item):
            scored_rows.append(index)
            cols.append(k - 1)
            targets.append(item.ids[k])
            owner.append(index)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
    return _layout(inputs, scored_rows, cols, targets, owner, len(examples))


def _layout(inputs: dict, rows: list[int], cols: list[int], targets: list[int], owner: list[int], n: int) -> PackedLayout:
    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return PackedLayout(inputs, long(rows), long(cols), long(targets), long(owner), n)


def packing_unsupported(model, max_tokens: int | None = None) -> str | None:
    """Why ``model`` cannot run packed rows, or None when it can.

    Packed rows need an attention kernel that applies a custom 4-D additive mask (transformers'
    ``eager`` or ``sdpa``; flash-attention and others build their own causal mask and would let
    the examples of a row see each other).  Sliding-window layers (Gemma 3, Mistral-style configs)
    take the 4-D block mask as given, without their window, so an example longer than the window
    would attend further back packed than padded: refused when ``max_tokens`` (the longest example,
    ``UnlearnConfig.max_length``) exceeds ``config.sliding_window``, or is unknown.
    """
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and implementation not in PACKING_ATTENTION:
        return (f"attention '{implementation}' cannot take the block mask of packed rows (needs "
                f"{' or '.join(PACKING_ATTENTION)})")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = isinstance(window, int) and (layer_types is None or "sliding_attention" in layer_types)
    if sliding and getattr(config, "use_sliding_window", True) is not False and (max_tokens is None or max_tokens > window):
        return (f"examples of up to {max_tokens} tokens exceed the model's sliding window ({window}), which the "
                f"block mask of packed rows would not apply")
    return None
