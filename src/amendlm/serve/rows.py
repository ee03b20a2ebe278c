"""Per-request parts of a served batch: each row's sampling (temperature, top-p, seed) and its text.

A served batch holds requests that share a model pair and a :class:`~amendlm.ram.decoding.DecodeConfig`
(the RAM rule), but each keeps its own OpenAI sampling parameters.  They act on the **rule's output**:
the rule builds the step's logits from ``(proposal_logits, aligner_logits)``; this row's ``temperature``
divides them and its ``top_p`` keeps their nucleus before one draw from the row's own seeded generator.
The OpenAI defaults (``temperature`` 1, ``top_p`` 1) leave the rule's distribution as it is;
``temperature`` 0 is greedy (argmax of the rule's logits, as ``amendlm align generate --greedy``).
Each row draws from its own seeded generator, so batch company never consumes its random numbers;
its text is the same as alone up to floating-point differences from batching (padding, batch
size), which can flip near-ties.  A row with ``temperature`` 0 and no ``seed`` is seeded with 0, so
a greedy request is deterministic in every mode (``sir`` still draws its candidates and resamples
one: its rule returns that token alone, so temperature and top-p leave it unchanged).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.ram.decoding import DecodeConfig, apply_rule, get_mode, masked, top_p_mask


@dataclass
class Sampling:
    """OpenAI sampling parameters of one request.

    Attributes:
        max_tokens: new tokens at most (>= 1).
        temperature: divides the rule's logits; 0 = greedy.  In [0, 2] as OpenAI's.
        top_p: nucleus of the tempered rule distribution, in (0, 1]; 1 = off.
        seed: seeds this row's generator (``None``: a fresh random seed, or 0 when ``temperature`` is 0).
        stop: strings that end the text (the text returned stops before the first one).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generators(samplings: Sequence[Sampling], device: torch.device) -> list[torch.Generator]:
    """One ``torch.Generator`` per row, seeded with the row's seed (none: 0 if greedy, else a random one)."""
    generators = []
    for sampling in samplings:
        generator = torch.Generator(device=device)
        seed = sampling.seed if sampling.seed is not None else (0 if sampling.greedy else None)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        generators.append(generator)
    return generators


def make_chooser(decode: DecodeConfig, samplings: Sequence[Sampling], generators: Sequence[torch.Generator],
                 eos_token_id: int | None):
    """A ``choose(proposal_logits, aligner_logits, rows)`` for :func:`amendlm.ram.generate.decode_steps`.

    Logits are ``(live, vocab)``; ``rows`` ``(live,)`` index ``samplings`` and ``generators``.
    Deterministic rules run once on the whole batch; a stochastic rule (``sir``) runs row by row
    with each row's generator, so its candidate draws are the row's own.  Returns ``(live,)`` ids.
    """
    stochastic = get_mode(decode.mode).stochastic

    def choose(proposal_logits, aligner_logits, rows):
        rows = rows.tolist()
        if stochastic:
            def one(logits, i):
                return None if logits is None else logits[i:i + 1]
            rule_logits = torch.cat([apply_rule(one(proposal_logits, i), one(aligner_logits, i), decode, eos_token_id,
                                                generator=generators[row]) for i, row in enumerate(rows)])
        else:
            rule_logits = apply_rule(proposal_logits, aligner_logits, decode, eos_token_id)
        token_ids = rule_logits.argmax(-1)
        for i, row in enumerate(rows):
            sampling = samplings[row]
            if sampling.greedy:
                continue
            logits = rule_logits[i:i + 1] / sampling.temperature
            if sampling.top_p < 1.0:
                logits = masked(logits, top_p_mask(logits, sampling.top_p))
            token_ids[i] = torch.multinomial(logits.softmax(-1), 1, generator=generators[row]).squeeze()
        return token_ids

    return choose


class RowText:
    """The text of one row as its tokens arrive: incremental deltas, stop strings, token budget.

    Text never runs past a stop string: the last ``len(longest stop) - 1`` characters are held back
    until they cannot begin one, and a character cut mid-way through a multi-byte token sequence
    (decoded as U+FFFD) waits for its next byte.  :attr:`text` is always the decode of all the
    row's ids (stop-trimmed): the whole answer.  Should a new decode change text already handed out
    (a tokenizer's clean-up across tokens), the next delta is what follows the common prefix, so
    the streamed pieces may then differ from :attr:`text`.

    Args:
        tokenizer: decodes the row's ids (special tokens skipped).
        sampling: the row's stop strings and ``max_tokens``.
    """

    def __init__(self, tokenizer, sampling: Sampling):
        self.tokenizer, self.sampling = tokenizer, sampling
        self.token_ids: list[int] = []
        self.text = ""
        self._sent = ""  # the text (as decoded then) already handed out
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in sampling.stop), default=1) - 1

    def add(self, token_id: int) -> str:
        """Append one token; returns the text that can be sent now (may be empty).  Sets
        :attr:`finish_reason` to ``stop`` (a stop string) or ``length`` (``max_tokens`` reached)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:max(cut, len(self._sent))]
            self.finish_reason = "stop"
            return self._take(len(self.text))
        if len(self.token_ids) >= self.sampling.max_tokens:
            self.finish_reason = "length"
            return self._take(len(self.text))
        safe = len(self.text) - self._hold
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        return self._take(safe)

    def finish(self, reason: str) -> str:
        """End the row (``stop`` for EOS, ``length``); returns the text still held back."""
        self.finish_reason = self.finish_reason or reason
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        sent = self._sent
        start = len(sent) if self.text.startswith(sent) else len(os.path.commonprefix([sent, self.text]))
        if end <= start:
            return ""
        delta, self._sent = self.text[start:end], self.text[:end]
        return delta
