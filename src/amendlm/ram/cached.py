"""The pieces of the decoding loop that touch models: one causal LM stepped with its KV cache, left
padding with exact position ids, and the vocabulary two models decode over.

:class:`CachedLM` prefills left-padded prompts once (only the last position's logits computed), then
feeds one token per row per step; position ids come from the attention mask, so a padded row sees
exactly the positions it would see alone.  Logits are sliced to the shared tokenizer's length
(:func:`shared_vocab_size`), so padded embedding rows never sample.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from amendlm.modeling import autocast


def shared_vocab_size(proposal_tokenizer, aligner_tokenizer, proposal_name: str, aligner_name: str,
                      proposal_model=None, aligner_model=None) -> int:
    """The vocabulary both models decode over: the tokenizer's length, checked on both sides.

    Padded embedding matrices (e.g. 151,936 rows for a 151,665-token tokenizer) are fine: logits are
    sliced to the tokenizer's length.  Models whose tokenizers differ cannot be combined token by token.

    Raises:
        ValueError: the tokenizers' vocabularies differ, or a model has fewer output rows than the
            tokenizer has tokens; the message names both models.
    """
    proposal_vocab, aligner_vocab = proposal_tokenizer.get_vocab(), aligner_tokenizer.get_vocab()
    if proposal_vocab != aligner_vocab:
        differing = sorted(set(proposal_vocab.items()) ^ set(aligner_vocab.items()), key=str)[:3]
        raise ValueError(
            f"proposal '{proposal_name}' ({len(proposal_vocab)} tokens) and aligner '{aligner_name}' "
            f"({len(aligner_vocab)} tokens) have different vocabularies (e.g. {differing}); RAM needs one "
            "shared tokenizer"
        )
    vocab_size = len(proposal_tokenizer)
    for name, model in ((proposal_name, proposal_model), (aligner_name, aligner_model)):
        if model is None:
            continue
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise ValueError(
                f"model '{name}' has {rows} output rows but the tokenizer shared by proposal '{proposal_name}' "
                f"and aligner '{aligner_name}' has {vocab_size} tokens"
            )
    return vocab_size


def cache_argument(model) -> str:
    """Name of the KV-cache keyword of ``model.forward``: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class CachedLM:
    """A causal LM stepped one token at a time over a batch, with its KV cache and attention mask.

    Logits are returned for the last position only, fp32, sliced to ``vocab_size``: ``(batch, vocab)``.
    """

    def __init__(self, model, vocab_size: int, dtype: torch.dtype = torch.float32):
        self.model, self.vocab_size, self.dtype = model, vocab_size, dtype
        self.device = next(model.parameters()).device
        self.cache = None
        self.attention_mask: torch.Tensor | None = None
        self._cache_arg = cache_argument(model)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {self._cache_arg: self.cache} if self.cache is not None else {}
        with autocast(self.dtype, self.device):
            out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else out.past_key_values
        return out.logits[:, -1, : self.vocab_size].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``(batch, seq_len)``; returns next-token logits ``(batch, vocab)``."""
        self.cache = None
        self.attention_mask = attention_mask.to(self.device)
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(input_ids.to(self.device), position_ids)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(batch,)``; returns next-token logits ``(batch, vocab)``."""
        position_ids = self.attention_mask.sum(-1, keepdim=True)  # real tokens so far = next position
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        return self._forward(token_ids.to(self.device).unsqueeze(-1), position_ids)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch) in the KV cache and the attention mask."""
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.attention_mask = self.attention_mask[rows]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, max_len)`` long, prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {row} has no tokens")
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask
