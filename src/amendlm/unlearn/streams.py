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
from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.scoring import EncodedPair, collate, encode_pairs
from amendlm.unlearn.data import Example, UnlearnSets, differing_tokens

PAIRED_STREAMS = ("chosen", "rejected")


@dataclass(frozen=True)
class MaskedPair(EncodedPair):
    """An :class:`EncodedPair` whose continuation tokens count only where ``kept`` is True
    (one flag per continuation token, ``len(kept) == n_scored``; ``loss_tokens="differing"``)."""

    kept: tuple[bool, ...] = ()


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int, differing: bool = False) -> list[EncodedPair]:
    """Tokenize examples (:func:`amendlm.scoring.encode_pairs`); too-long ones keep the start
    token and their last ``max_length - 1`` tokens (the continuation is at the end).

    With ``differing``, an example with a ``counterpart`` becomes a :class:`MaskedPair` that
    scores only the continuation tokens differing from the counterpart's
    (:func:`amendlm.unlearn.data.differing_tokens`, each side tokenized with its own prefix).
    """
    encoded = encode_pairs(tokenizer, [(e.prefix, e.continuation) for e in examples])
    paired = [i for i, e in enumerate(examples) if differing and e.counterpart is not None]
    others = dict(zip(paired, encode_pairs(tokenizer, [examples[i].counterpart for i in paired]))) if paired else {}
    out = []
    for index, item in enumerate(encoded):
        kept = None
        if index in others:
            other = others[index]
            kept = differing_tokens(item.ids[-item.n_scored:], other.ids[-other.n_scored:])
        if len(item.ids) > max_length:
            item = EncodedPair([item.ids[0], *item.ids[-(max_length - 1):]], min(item.n_scored, max_length - 1))
        out.append(item if kept is None else MaskedPair(item.ids, item.n_scored, kept[-item.n_scored:]))
    return out


def collate_stream(batch: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`amendlm.scoring.collate` (right padding), then ``loss_mask`` set to 0 on the
    continuation tokens a :class:`MaskedPair` does not keep.  All tensors ``(batch, seq_len)``."""
    inputs = collate(batch, pad_id)
    for row, item in enumerate(batch):
        if isinstance(item, MaskedPair):
            begin = len(item.ids) - item.n_scored  # first continuation position (right padding)
            dropped = [begin + i for i, keep in enumerate(item.kept) if not keep]
            inputs["loss_mask"][row, dropped] = 0
    return inputs


def encode_streams(tokenizer, sets: UnlearnSets, names: Sequence[str], max_length: int,
                   loss_tokens: str = "all") -> dict[str, list[EncodedPair]]:
    """The tokenized examples of each stream in ``names`` (``chosen`` / ``rejected``: the two sides
    of ``sets.pairs``, index-aligned); each at most ``max_length`` tokens (:func:`encode_examples`).
    ``loss_tokens="differing"`` masks shared tokens in every stream but ``kl``."""
    examples = {"forget": sets.forget, "retain": sets.retain, "kl": sets.kl,
                "chosen": [p.chosen for p in sets.pairs], "rejected": [p.rejected for p in sets.pairs]}
    differing = loss_tokens == "differing"
    return {name: encode_examples(tokenizer, examples[name], max_length, differing and name != "kl") for name in names}


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


def sampler_tag(stream: str, focus: str | None, swap: bool) -> str:
    """The name of the sampler of ``stream`` in one focus / swap state, e.g. ``forget:gender:False``
    (``pairs:...`` for ``chosen`` and ``rejected``); it also seeds the sampler's order."""
    return f"{sampler_key(stream)}:{focus}:{swap}"


class StreamSamplers:
    """Every sampler a run has used, one per (stream, focus, swap) tag, kept across focus changes.

    Dynamic swapping rebuilds the streams each time the focus changes; a state seen before gets
    its sampler back where it stopped (same epoch and position), so a revisited bias type draws
    its *next* batches rather than its first ones again.  :meth:`state_dict` holds every tag's
    position, for the checkpoint.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._samplers: dict[str, StreamSampler] = {}
        self._saved: dict[str, dict] = {}  # loaded from a checkpoint, not used since

    def sampler(self, tag: str, size: int) -> StreamSampler:
        """The sampler named ``tag`` over a stream of ``size`` examples: the one used before, else
        a new one (continuing from a loaded state of the same size, if any).

        Raises:
            ValueError: ``size < 1``.
        """
        found = self._samplers.get(tag)
        if found is None or found.size != size:
            found = StreamSampler(size, self.seed, tag)
            if tag in self._saved:
                found.load_state_dict(self._saved.pop(tag))
            self._samplers[tag] = found
        return found

    def state_dict(self) -> dict[str, dict]:
        """``{tag: StreamSampler.state_dict()}`` of every tag used or loaded (JSON-able)."""
        return {**self._saved, **{tag: s.state_dict() for tag, s in self._samplers.items()}}

    def load_state_dict(self, states: dict[str, dict]) -> None:
        """Forget the current samplers; each tag's next :meth:`sampler` continues from ``states``."""
        self._samplers, self._saved = {}, dict(states)
