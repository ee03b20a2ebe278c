"""Training sets of BiasUnlearn built from StereoSet *train* targets (DESIGN.md §4).

Every example is a ``(prefix, continuation)`` pair whose loss covers the continuation only
(:meth:`amendlm.data.stereoset.StereoSetCluster.training_pair`): intrasentence prefix = the
text before BLANK, intersentence prefix = the context.

* **forget** (the NPO / ascent side): the stereotype of every cluster, plus the *adversarial*
  share of anti-stereotypes, drawn per bias type, so the model forgets the association rather
  than one side of it;
* **retain** (the cross-entropy side): the anti-stereotype of every cluster (the adversarial
  ones included);
* **kl** (kept close to the reference): the unrelated sentences, plus chunks of a general text.

When a bias type's roles are *swapped* (its SS fell below 50), stereotype and anti-stereotype
exchange places for that type only.  ``focus`` restricts forget and retain to one bias type
(dynamic dataset swapping trains on the worst category); the KL set is never restricted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from amendlm.data.stereoset import StereoSetCluster


@dataclass(frozen=True)
class Example:
    """One training example: the loss is on ``continuation`` given ``prefix``."""

    prefix: str
    continuation: str
    bias_type: str  # "" for general text
    label: str  # stereotype | anti_stereotype | unrelated | text
    cluster_id: str = ""
    # (prefix, continuation) of the other side of the same cluster (stereotype <-> anti-stereotype),
    # for loss_tokens="differing" (:func:`differing_tokens`); None for unrelated and general text
    counterpart: tuple[str, str] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PreferencePair:
    """A DPO pair from one StereoSet context: chosen = anti-stereotype, rejected = stereotype."""

    chosen: Example
    rejected: Example


@dataclass
class UnlearnSets:
    """The example lists of one training configuration (see the module docstring)."""

    forget: list[Example]
    retain: list[Example]
    kl: list[Example]
    pairs: list[PreferencePair]

    def sizes(self) -> dict[str, int]:
        """Number of examples per set (for logs and summaries)."""
        return {"forget": len(self.forget), "retain": len(self.retain), "kl": len(self.kl), "pairs": len(self.pairs)}


_OTHER_SIDE = {"stereotype": "anti_stereotype", "anti_stereotype": "stereotype"}


def example(cluster: StereoSetCluster, label: str) -> Example:
    """The training pair of ``cluster`` for ``label`` as an :class:`Example` (with the other
    side's pair as ``counterpart`` for a stereotype or anti-stereotype)."""
    prefix, continuation = cluster.training_pair(label)
    other = _OTHER_SIDE.get(label)
    counterpart = cluster.training_pair(other) if other else None
    return Example(prefix, continuation, cluster.bias_type, label, cluster.id, counterpart)


def differing_tokens(continuation_ids: Sequence[int], counterpart_ids: Sequence[int]) -> tuple[bool, ...]:
    """Which continuation tokens differ from the other side's: neither in the common prefix nor in the common suffix.

    The two continuations are aligned from both ends: the longest common prefix (" She is a")
    and the longest common suffix (the final ".") are shared; every token in between is kept.
    For " She is a nurse." vs " She is a doctor." only " nurse" is kept, also when the two words
    have different token counts (``[5, 6, 7]`` vs ``[5, 9, 10, 7]`` keeps only ``6``).  A loss on
    the shared tokens would push the stereotype and the anti-stereotype sides against each
    other on the same tokens (issue 9: 56 % of the intrasentence stereotype continuation tokens
    are shared).  Identical continuations keep nothing.

    Args:
        continuation_ids: the token ids of this example's continuation (length ``n``).
        counterpart_ids: the token ids of the other side's continuation.

    Returns:
        ``n`` booleans, True = the token counts in the loss.
    """
    n, m = len(continuation_ids), len(counterpart_ids)
    prefix = 0
    while prefix < min(n, m) and continuation_ids[prefix] == counterpart_ids[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n, m) - prefix and continuation_ids[n - 1 - suffix] == counterpart_ids[m - 1 - suffix]:
        suffix += 1
    return tuple(prefix <= i < n - suffix for i in range(n))


def adversarial_ids(
    clusters: Sequence[StereoSetCluster], fraction: float, seed: int
) -> set[str]:
    """Ids of the clusters whose *other* side joins the forget set, ``round(fraction * n)`` per bias type.

    Stratified: each bias type contributes its own share; the draw is seeded and depends only
    on the cluster ids of each bias type, not on their order.

    Raises:
        ValueError: ``fraction`` outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"adversarial fraction must be in [0, 1], got {fraction}")
    by_type: dict[str, list[str]] = {}
    for cluster in clusters:
        by_type.setdefault(cluster.bias_type, []).append(cluster.id)
    chosen: set[str] = set()
    for bias_type in sorted(by_type):
        ids = sorted(by_type[bias_type])
        rng = random.Random(f"{seed}:{bias_type}")
        chosen.update(rng.sample(ids, round(fraction * len(ids))))
    return chosen


def text_chunks(texts: Iterable[str], tokenizer, n_tokens: int) -> list[Example]:
    """Cut general texts into chunks of about ``n_tokens`` tokens, decoded back to strings.

    Each chunk is a whole-text example (empty prefix, every token scored).
    """
    if n_tokens < 2:
        raise ValueError(f"chunk length must be >= 2 tokens, got {n_tokens}")
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for begin in range(0, len(ids), n_tokens):
            piece = tokenizer.decode(ids[begin : begin + n_tokens])
            if piece.strip():
                chunks.append(Example("", piece, "", "text"))
    return chunks


def build_sets(
    clusters: Sequence[StereoSetCluster],
    adversarial_fraction: float = 0.25,
    seed: int = 0,
    swapped: Iterable[str] = (),
    focus: str | Iterable[str] | None = None,
    general_texts: Sequence[Example] = (),
    kl_unrelated: bool = True,
) -> UnlearnSets:
    """Build forget / retain / KL sets and DPO pairs from (train-split) clusters.

    Args:
        clusters: StereoSet clusters; pass only the *train* targets.
        adversarial_fraction: share of each bias type's clusters whose retain-side sentence is
            also added to the forget set (DESIGN.md §4: 0.25).
        seed: seed of the adversarial draw.
        swapped: bias types whose roles are exchanged (anti-stereotype forgotten, stereotype retained).
        focus: keep only this bias type (or these bias types) in forget, retain and pairs (``None``: all types).
        general_texts: extra KL examples (e.g. :func:`text_chunks` of a general corpus).
        kl_unrelated: put every cluster's unrelated sentence in the KL set (DESIGN.md §4); False
            leaves only ``general_texts`` there.

    Raises:
        ValueError: ``focus`` names a bias type absent from ``clusters``.
    """
    swapped = set(swapped)
    types = {c.bias_type for c in clusters}
    kept = None if focus is None else ({focus} if isinstance(focus, str) else set(focus))
    for name in sorted(kept or ()):
        if name not in types:
            raise ValueError(f"focus bias type '{name}' not in the data; valid: {', '.join(sorted(types))}")
    adversarial = adversarial_ids(clusters, adversarial_fraction, seed)
    forget, retain, kl, pairs = [], [], [], []
    for cluster in clusters:
        if kl_unrelated:
            kl.append(example(cluster, "unrelated"))
        if kept is not None and cluster.bias_type not in kept:
            continue
        forget_label, retain_label = "stereotype", "anti_stereotype"
        if cluster.bias_type in swapped:
            forget_label, retain_label = retain_label, forget_label
        forget.append(example(cluster, forget_label))
        retain.append(example(cluster, retain_label))
        if cluster.id in adversarial:
            forget.append(example(cluster, retain_label))
        pairs.append(PreferencePair(chosen=example(cluster, retain_label), rejected=example(cluster, forget_label)))
    kl.extend(general_texts)
    return UnlearnSets(forget=forget, retain=retain, kl=kl, pairs=pairs)
