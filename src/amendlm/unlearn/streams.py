"""Example streams of the unlearning loop: tokenized training sets and their seeded samplers.

A *stream* is one list of tokenized examples that the loop draws a batch from at every step
(``forget``, ``retain``, ``kl``, ``chosen`` / ``rejected``; see
:data:`amendlm.unlearn.methods.STREAMS`).  :func:`encode_streams` builds them from the
:class:`~amendlm.unlearn.data.UnlearnSets` of the current focus / swap state;
:class:`StreamSampler` walks one stream in seeded, shuffled epochs.  ``chosen`` and
``rejected`` are one DPO pair per index and share one sampler (:func:`sampler_key`), so a
batch of pairs stays aligned.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from amendlm.scoring import EncodedPair, encode_pairs
from amendlm.unlearn.data import Example, UnlearnSets

PAIRED_STREAMS = ("chosen", "rejected")


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int) -> list[EncodedPair]:
    """Tokenize examples (:func:`amendlm.scoring.encode_pairs`); too-long ones keep the start
    token and their last ``max_length - 1`` tokens (the continuation is at the end)."""
    encoded = encode_pairs(tokenizer, [(e.prefix, e.continuation) for e in examples])
    out = []
    for item in encoded:
        if len(item.ids) > max_length:
            item = EncodedPair([item.ids[0], *item.ids[-(max_length - 1):]], min(item.n_scored, max_length - 1))
        out.append(item)
    return out


def encode_streams(tokenizer, sets: UnlearnSets, names: Sequence[str], max_length: int) -> dict[str, list[EncodedPair]]:
    """The tokenized examples of each stream in ``names`` (``chosen`` / ``rejected``: the two sides
    of ``sets.pairs``, index-aligned); each at most ``max_length`` tokens (:func:`encode_examples`)."""
    examples = {"forget": sets.forget, "retain": sets.retain, "kl": sets.kl,
                "chosen": [p.chosen for p in sets.pairs], "rejected": [p.rejected for p in sets.pairs]}
    return {name: encode_examples(tokenizer, examples[name], max_length) for name in names}


def sampler_key(stream: str) -> str:
    """The sampler a stream draws from: ``pairs`` for ``chosen`` and ``rejected``, else its own name."""
    return "pairs" if stream in PAIRED_STREAMS else stream


class StreamSampler:
    """Seeded epochs of shuffled indices over one stream; its state is two integers.

    The order of epoch ``e`` is a permutation seeded by ``crc32(f"{seed}:{name}:{e}")``, so two
    samplers with the same size, seed and name draw the same indices.

    Raises:
        ValueError: ``size < 1`` (an empty stream).
    """

    def __init__(self, size: int, seed: int, name: str):
        if size < 1:
            raise ValueError(f"stream '{name}' is empty")
        self.size, self.seed, self.name = size, seed, name
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.name}:{self.epoch}".encode()))
        return torch.randperm(self.size, generator=generator)

    def take(self, n: int) -> list[int]:
        """The next ``n`` indices (crossing into the next epoch when needed)."""
        picked: list[int] = []
        while len(picked) < n:
            order = self._order()
            chunk = order[self.position : self.position + n - len(picked)].tolist()
            picked += chunk
            self.position += len(chunk)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def state_dict(self) -> dict:
        """``{"epoch", "position", "size"}`` (JSON-able)."""
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; ignored when it was saved for a stream of another size."""
        if state["size"] == self.size:
            self.epoch, self.position = state["epoch"], state["position"]
