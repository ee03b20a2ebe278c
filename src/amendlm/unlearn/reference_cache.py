"""What the frozen reference gives once: per-example reference log-probs, computed once per run.

The reference (the base model under the disabled adapter, in eval mode, or a frozen copy) never
changes during a run, so the summed log-prob of an example's scored tokens under it
(``log pi_ref(y|x)`` of NPO and DPO) is a constant of the example.  :class:`ReferenceCache`
keeps it, keyed by the example's content (token ids and which tokens are scored, so a stream
rebuilt for another focus finds its examples again), for at most ``capacity`` examples (the
least recently *stored* is dropped first; a dropped example is simply computed again).

The KL term needs the reference's whole next-token distribution at every scored position
(``(tokens, vocab)`` floats per example); that is not cached (a top-k summary would change the
loss), so the ``kl`` stream's reference pass runs every step.

Determinism: a cached value was computed in the batch that first held its example, a fresh one
in the current batch; the two agree up to float rounding.  The cache is saved in the
checkpoint (:meth:`ReferenceCache.state_dict`), and stored only from the gathered global batch,
so a resumed run and every process of a data-parallel run use exactly the same values as an
uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

from amendlm.scoring import EncodedPair
from amendlm.unlearn.packing import scored_positions

DEFAULT_CAPACITY = 1 << 16
"""Examples kept (about 100 bytes each in memory, 40 in ``checkpoint/state.json``): more than
StereoSet's ~8,500 training sentences of every stream together."""


def example_key(item: EncodedPair) -> str:
    """A content key of ``item``: a 20-hex-digit BLAKE2b of its token ids and its scored positions.

    Two examples with the same key get the same reference log-prob (the same tokens, scored on
    the same positions: :func:`amendlm.unlearn.packing.scored_positions`).
    """
    digest = hashlib.blake2b(digest_size=10)
    digest.update(array("q", item.ids).tobytes())
    digest.update(b"|")
    digest.update(array("q", scored_positions(item)).tobytes())
    return digest.hexdigest()


class ReferenceCache:
    """Per-example reference log-probs (natural log, summed over the scored tokens), bounded.

    Raises:
        ValueError: ``capacity < 1``.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._values: OrderedDict[str, float] = OrderedDict()
        self.lookups = self.hits = 0  # counted since construction (not saved): the benchmark's hit rate

    def __len__(self) -> int:
        return len(self._values)

    def lookup(self, items: Sequence[EncodedPair]) -> list[float | None]:
        """The cached value of each item, or None where it is not cached (the order of the entries is not changed)."""
        found = [self._values.get(example_key(item)) for item in items]
        self.lookups += len(found)
        self.hits += sum(value is not None for value in found)
        return found

    def store(self, items: Sequence[EncodedPair], values: Sequence[float]) -> None:
        """Store ``values[i]`` for ``items[i]`` (as the most recent), dropping the oldest beyond ``capacity``.

        Raises:
            ValueError: different numbers of items and values.
        """
        if len(items) != len(values):
            raise ValueError(f"{len(items)} items but {len(values)} values")
        for item, value in zip(items, values):
            key = example_key(item)
            self._values.pop(key, None)
            self._values[key] = float(value)
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)

    def state_dict(self) -> list[list]:
        """``[[key, value], ...]`` oldest first (JSON-able; floats round-trip exactly)."""
        return [[key, value] for key, value in self._values.items()]

    def load_state_dict(self, state: Sequence[Sequence]) -> None:
        """Replace the contents by a :meth:`state_dict` (the oldest beyond ``capacity`` dropped)."""
        self._values = OrderedDict((str(key), float(value)) for key, value in state)
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)
