"""What each decoding step followed: the proposal's argmax, the aligner's argmax, PAR-KL's fallback.

RAM's modes differ in how much the aligner steers; these counts give that as data.  Per decoded
token step (one row choosing one token, the EOS step included), :func:`choice_flags` says (a pure
function of the step's logits and chosen tokens)

* ``fallback``: ``par-kl`` used the proposal because ``KL(P_M || Q) > kl_threshold``;
* ``aligner_argmax``: the chosen token is the aligner's most likely token;
* ``proposal_argmax``: the chosen token is the proposal's most likely token;

and :class:`ChoiceCounts` adds them up over a run; :meth:`ChoiceCounts.rates` gives the shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amendlm.ram.decoding import DecodeConfig, get_mode, par_kl_fallback

CHOICE_FLAGS = ("fallback", "aligner_argmax", "proposal_argmax")


def choice_flags(config: DecodeConfig, proposal_logits: torch.Tensor | None, aligner_logits: torch.Tensor | None,
                 token_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """What one step's chosen tokens followed, per row.

    Args:
        config: the step's rule parameters (``mode`` decides whether ``fallback`` applies).
        proposal_logits, aligner_logits: ``(batch, vocab)`` as the rule saw them, or ``None`` for a
            model the mode does not run.
        token_ids: ``(batch,)`` the tokens chosen.

    Returns:
        ``{"fallback", "aligner_argmax", "proposal_argmax"}``, each ``(batch,)`` bool or ``None``:
        ``fallback`` only in ``par-kl`` (:func:`amendlm.ram.decoding.par_kl_fallback`); an argmax flag
        is ``None`` when its model is not run.
    """
    fallback = None
    if get_mode(config.mode).name == "par-kl":
        fallback = par_kl_fallback(proposal_logits, aligner_logits, config)
    device = (aligner_logits if aligner_logits is not None else proposal_logits).device
    token_ids = token_ids.to(device)
    return {"fallback": fallback,
            "aligner_argmax": None if aligner_logits is None else aligner_logits.argmax(-1) == token_ids,
            "proposal_argmax": None if proposal_logits is None else proposal_logits.argmax(-1) == token_ids}


@dataclass
class ChoiceCounts:
    """Counts over decoded token steps: ``steps`` (rows x steps while the row was decoding) and, per flag
    of :func:`choice_flags`, how many of them had it (``None``: the flag does not apply to the mode)."""

    steps: int = 0
    fallback: int | None = None
    aligner_argmax: int | None = None
    proposal_argmax: int | None = None

    def add(self, flags: dict[str, torch.Tensor | None], active: torch.Tensor) -> None:
        """Count one step: ``flags`` of :func:`choice_flags`, ``active`` ``(batch,)`` bool the rows that chose a token.

        Synchronises with the device once per call (``.item()``); call it per batch on summed tensors
        where that matters.
        """
        self.merge(count_flags(flags, active))

    def merge(self, other: "ChoiceCounts") -> None:
        """Add another count (e.g. one batch's) to this one."""
        self.steps += other.steps
        for name in CHOICE_FLAGS:
            theirs = getattr(other, name)
            if theirs is not None:
                setattr(self, name, (getattr(self, name) or 0) + theirs)

    def rates(self) -> dict[str, float | int | None]:
        """``{"token_steps", "fallback_rate", "follows_aligner_argmax", "follows_proposal_argmax"}``: shares in
        [0, 1] of the decoded token steps (``None`` where the flag does not apply or nothing was decoded)."""
        def share(count):
            return None if count is None or not self.steps else count / self.steps

        return {"token_steps": self.steps, "fallback_rate": share(self.fallback),
                "follows_aligner_argmax": share(self.aligner_argmax),
                "follows_proposal_argmax": share(self.proposal_argmax)}


def count_flags(flags: dict[str, torch.Tensor | None], active: torch.Tensor) -> ChoiceCounts:
    """:class:`ChoiceCounts` of one step: each flag counted over the ``active`` ``(batch,)`` rows only."""
    active = active.to(next((f.device for f in flags.values() if f is not None), active.device))
    counts = ChoiceCounts(steps=int(active.sum()))
    for name in CHOICE_FLAGS:
        flag = flags.get(name)
        if flag is not None:
            setattr(counts, name, int((flag & active).sum()))
    return counts
