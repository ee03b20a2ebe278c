"""RAM training losses as pure functions of the aligner's sequence log-probabilities.

Nothing here sees a model; :func:`amendlm.scoring.sequence_logps` produces the inputs.

Conventions (natural log):

* ``target_logps``: ``(batch,)`` **summed** ``log Q(y|x)`` over the tokens of a target response ``y``
  (response tokens and the closing EOS; prompt and padding excluded);
* ``sample_logps``: ``(batch,)`` summed ``log Q(y'|x)`` over a proposal sample ``y' ~ P_M(.|x)``;
* ``*_n_tokens``: ``(batch,)`` counts of those tokens, used only when ``per_token=True``;
* every loss returns a scalar to *minimise* and a dict of detached diagnostics.

Both losses take the same two tensors (positive = target / chosen, negative = proposal sample /
rejected), so the trainer runs one concatenated forward and picks the loss from :data:`LOSSES`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    """Which loss and its weights.

    Attributes:
        name: ``residual`` (RAM's importance-sampling objective) or ``dpo`` (reference-free DPO).
        alpha: weight of the proposal-sample term of ``residual``; RAM's default 1e-4, reported
            insensitive from 1e-5 to 0.1 (arXiv:2505.19700).  0 gives plain SFT of the aligner.
        beta: DPO inverse temperature; 1.0 (RAM's preference variant).
        per_token: average each sequence's log-prob over its tokens before the batch mean
            (default False: per-sequence sums, as in the paper's ``log Q(y|x)``).
    """

    name: str = "residual"
    alpha: float = 1e-4
    beta: float = 1.0
    per_token: bool = False

    def __post_init__(self) -> None:
        get_loss(self.name)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def _normalise(logps: torch.Tensor, n_tokens: torch.Tensor | None, per_token: bool) -> torch.Tensor:
    if not per_token:
        return logps
    if n_tokens is None:
        raise ValueError("per_token=True needs the token counts")
    return logps / n_tokens.clamp(min=1).to(logps.dtype)


def residual_loss(
    target_logps: torch.Tensor,
    sample_logps: torch.Tensor,
    config: LossConfig,
    target_n_tokens: torch.Tensor | None = None,
    sample_n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RAM's objective (arXiv:2505.19700, Sec. 3): ``L = -E[log Q(y|x)] + alpha * E[log Q(y'|x)]``.

    The first term fits the aligner to the targets; the second, over offline proposal samples
    ``y' ~ P_M``, removes what the proposal already produces, so that ``P_M * Q`` (not ``Q``)
    matches the targets.  Expectations are batch means; log-probs are per-sequence sums unless
    ``config.per_token``.

    Args:
        target_logps, sample_logps: ``(batch,)`` summed aligner log-probs (may differ in batch size).

    Returns:
        ``(loss, {"nll", "sample_logp"})``: the scalar loss and its two terms (detached).
    """
    target = _normalise(target_logps, target_n_tokens, config.per_token)
    sample = _normalise(sample_logps, sample_n_tokens, config.per_token)
    nll = -target.mean()
    sample_term = sample.mean() if sample.numel() else target.new_zeros(())
    loss = nll + config.alpha * sample_term
    return loss, {"nll": nll.detach(), "sample_logp": sample_term.detach()}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    config: LossConfig,
    chosen_n_tokens: torch.Tensor | None = None,
    rejected_n_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference-free DPO on the aligner alone: ``-mean log sigmoid(beta * (log Q(y_w|x) - log Q(y_l|x)))``.

    DPO (Rafailov et al. 2023, Eq. 7) with the reference log-ratio dropped: RAM's preference variant
    trains ``Q`` only, the frozen proposal playing the reference's role at decoding time.

    Args:
        chosen_logps, rejected_logps: ``(batch,)`` summed aligner log-probs of paired responses.

    Returns:
        ``(loss, {"margin", "accuracy"})``: mean ``logQ(y_w) - logQ(y_l)`` and the share of pairs where
        it is positive (detached).

    Raises:
        ValueError: the two tensors differ in shape (pairs must align).
    """
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"chosen {tuple(chosen_logps.shape)} and rejected {tuple(rejected_logps.shape)} must pair up")
    chosen = _normalise(chosen_logps, chosen_n_tokens, config.per_token)
    rejected = _normalise(rejected_logps, rejected_n_tokens, config.per_token)
    margin = chosen - rejected
    loss = -F.logsigmoid(config.beta * margin).mean()
    return loss, {"margin": margin.mean().detach(), "accuracy": (margin > 0).float().mean().detach()}


Loss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
LOSSES: dict[str, Loss] = {"residual": residual_loss, "dpo": dpo_loss}


def get_loss(name: str) -> Loss:
    """Look up a loss by name. Raises KeyError listing the valid names (and the closest one)."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}.{hint}")
    return LOSSES[name]


def token_kl(teacher_logps: torch.Tensor, student_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Distillation loss: ``KL(P_teacher || Q_student)`` per next-token position, averaged over the positions
    that ``mask`` keeps (Hinton et al. 2015 at temperature 1).

    ``KL = sum_v p_t(v) (log p_t(v) - log q_s(v))``; ``0 * log 0`` counts as 0 (a teacher token of
    probability 0 adds nothing).

    Args:
        teacher_logps, student_logps: ``(batch, seq_len, vocab)`` log-softmax outputs (natural log).
        mask: ``(batch, seq_len)`` bool, True where a position counts (padding False).

    Returns:
        scalar, nats per position.

    Raises:
        ValueError: the shapes do not match, or ``mask`` keeps no position.
    """
    if teacher_logps.shape != student_logps.shape or teacher_logps.shape[:2] != mask.shape:
        raise ValueError(f"teacher {tuple(teacher_logps.shape)}, student {tuple(student_logps.shape)} and mask "
                         f"{tuple(mask.shape)} do not match")
    if not mask.any():
        raise ValueError("token_kl: the mask keeps no position")
    teacher_probs = teacher_logps.exp()
    per_position = torch.where(teacher_probs > 0, teacher_probs * (teacher_logps - student_logps),
                               torch.zeros_like(teacher_probs)).sum(-1)  # (batch, seq_len)
    return per_position[mask].mean()


def product_kl_sums(proposal_logits: torch.Tensor, aligner_logits: torch.Tensor, loss_mask: torch.Tensor,
                    vocab_size: int) -> torch.Tensor:
    """The regulariser of a debiasing aligner: ``KL(P_M || pair)`` per sequence, summed over its scored positions.

    ``pair = softmax(b + a)`` over the ``V`` shared tokens (:func:`amendlm.product.product_logits` at
    ``T_b = T_e = 1``, the distribution the pair is scored and decoded with) and ``P_M = softmax(b)``
    over the same tokens; per position ``sum_v P_M(v) (log P_M(v) - log pair(v))``, nats.  It is 0
    exactly when the aligner's logits are constant over the vocabulary (e.g. an all-zero head,
    :func:`amendlm.ram.aligner_init.zero_output_head`), and it is the increase of the pair's
    cross-entropy over the proposal's on text the proposal predicts well, so keeping it small on
    neutral text keeps the pair's perplexity near the proposal's.  The proposal's logits carry no
    gradient (run it under ``no_grad``); the shift and the mask are as in
    :func:`amendlm.unlearn.losses.kl_sums`.

    Args:
        proposal_logits: ``(batch, seq_len, >= V)`` ``b``.
        aligner_logits: ``(batch, seq_len, >= V)`` ``a``.
        loss_mask: ``(batch, seq_len)``, 1 where ``input_ids[:, t]`` is a scored token.
        vocab_size: ``V``.

    Returns:
        ``(batch,)`` fp32 sums (divide by the number of scored positions for the per-position mean).

    Raises:
        ValueError: a tensor has fewer than ``V`` columns or the shapes do not match.
    """
    from amendlm.product import product_logits
    from amendlm.unlearn.losses import kl_sums

    pair = product_logits(proposal_logits, aligner_logits, vocab_size)
    return kl_sums(pair, proposal_logits[..., :vocab_size].float(), loss_mask)
