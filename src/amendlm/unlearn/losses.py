"""Unlearning and preference losses as pure functions of log-probabilities.

Nothing here sees a model: every function takes tensors that
:func:`amendlm.scoring.sequence_logps` (or a model's logits) produced, so each loss is checked
against hand-computed values in ``tests/test_unlearn_losses.py``.

Conventions (natural log throughout):

* ``*_logps`` are ``(batch,)`` **summed** log-probabilities of each sequence's scored tokens
  (continuation only; prefix, start token and padding are excluded by the loss mask);
* ``n_tokens`` is the ``(batch,)`` count of those tokens;
* "policy" is the model being trained (pi_theta); "reference" is the frozen model (pi_ref), with
  PEFT the same weights under :func:`amendlm.modeling.adapter_disabled`;
* every loss returns a scalar to *minimise*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NPO_REDUCTIONS = ("sequence", "token_mean", "batch_mean", "batch_sequence_mean")
CE_REDUCTIONS = ("token", "sequence")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def npo_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    beta: float = 0.1,
    n_tokens: torch.Tensor | None = None,
    reduction: str = "sequence",
) -> torch.Tensor:
    """Negative Preference Optimization on a forget batch (Zhang et al., 2024, Eq. 3).

    ``L = -(2/beta) * E[ log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x))) ]``

    At ``pi_theta = pi_ref`` the loss is ``(2/beta) * ln 2`` and its gradient is half that of
    gradient ascent; it falls to 0 as the policy's forget log-likelihood falls below the reference's.

    Args:
        policy_logps: ``(batch,)`` summed log-probs of the forget continuations under the policy.
        reference_logps: ``(batch,)`` the same under the reference (no gradient needed).
        beta: inverse temperature (DESIGN.md §4: 0.1).
        n_tokens: ``(batch,)`` scored tokens per sequence; required for ``"token_mean"`` and ``"batch_mean"``.
        reduction: ``"sequence"`` (default; open-unlearning): one log-ratio per sequence, the
            difference of summed log-probs, and the loss averaged over sequences.
            ``"token_mean"``: one log-ratio per sequence, normalised per token,
            ``(policy_logps_i - reference_logps_i) / n_tokens_i`` (the mean over the sequence's
            scored tokens of ``log pi_theta - log pi_ref``), then the NPO formula averaged over
            sequences; a sequence with no scored token contributes a log-ratio of 0.
            ``"batch_mean"`` (the BiasUnlearn code): one log-ratio for the whole batch, the
            difference of the policy's and reference's *token-mean* log-likelihood over all
            the batch's scored tokens (what ``model(..., labels=...).loss`` returns).
            ``"batch_sequence_mean"`` (exactly the official ``lm_loss``): one log-ratio for the
            whole batch, the mean over sequences of each sequence's token-mean log-ratio
            ``mean_i[(policy_logps_i - reference_logps_i) / n_tokens_i]`` (sequences weigh
            equally, not by their tokens as in ``"batch_mean"``).

    Returns:
        scalar tensor.

    Raises:
        ValueError: unknown ``reduction``, ``beta <= 0``, mismatched shapes, or a per-token
            reduction without ``n_tokens``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(policy_logps=policy_logps, reference_logps=reference_logps)
    if reduction in ("token_mean", "batch_mean", "batch_sequence_mean") and n_tokens is None:
        raise ValueError(f"npo_loss(reduction='{reduction}') needs n_tokens")
    if reduction == "sequence":
        log_ratio = policy_logps - reference_logps  # (batch,)
    elif reduction == "token_mean":
        _check_same_shape(policy_logps=policy_logps, n_tokens=n_tokens)
        log_ratio = (policy_logps - reference_logps) / n_tokens.clamp(min=1)  # (batch,) nats per token
    elif reduction == "batch_sequence_mean":
        _check_same_shape(policy_logps=policy_logps, n_tokens=n_tokens)
        log_ratio = ((policy_logps - reference_logps) / n_tokens.clamp(min=1)).mean()  # scalar
    elif reduction == "batch_mean":
        total = n_tokens.sum().clamp(min=1)
        log_ratio = (policy_logps.sum() - reference_logps.sum()) / total  # scalar
    else:
        raise ValueError(f"unknown NPO reduction '{reduction}'; valid: {', '.join(NPO_REDUCTIONS)}")
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def ce_loss(policy_logps: torch.Tensor, n_tokens: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Token-level cross-entropy (negative log-likelihood) over a batch.

    ``"token"`` (default): ``L = -sum_i logp_i / sum_i n_i``, the mean NLL per scored token over
    the whole batch (the reduction of ``model(..., labels=...).loss``), so long and short
    sequences weigh by their tokens.  ``"sequence"`` (the official BiasUnlearn ``lm_loss``):
    ``L = -mean_i(logp_i / n_i)``, each sequence's token-mean NLL, sequences weighing equally
    (a sequence with no scored token counts 0).  Used as BiasUnlearn's retain loss on
    anti-stereotypes and by the SFT / ascent baselines.

    Args:
        policy_logps: ``(batch,)`` summed log-probs of the scored tokens.
        n_tokens: ``(batch,)`` number of scored tokens (>= 0; the total must be > 0).
        reduction: ``"token"`` or ``"sequence"``.

    Returns:
        scalar tensor (nats per token).

    Raises:
        ValueError: mismatched shapes or an unknown ``reduction``.
    """
    _check_same_shape(policy_logps=policy_logps, n_tokens=n_tokens)
    if reduction == "token":
        return -policy_logps.sum() / n_tokens.sum().clamp(min=1)
    if reduction == "sequence":
        return -(policy_logps / n_tokens.clamp(min=1)).mean()
    raise ValueError(f"unknown CE reduction '{reduction}'; valid: {', '.join(CE_REDUCTIONS)}")


def gradient_ascent_loss(policy_logps: torch.Tensor, n_tokens: torch.Tensor, reduction: str = "token") -> torch.Tensor:
    """Gradient ascent on the forget set: ``-ce_loss`` (minimising it raises the NLL without bound)."""
    return -ce_loss(policy_logps, n_tokens, reduction)


def grad_diff_loss(
    forget_logps: torch.Tensor,
    forget_n_tokens: torch.Tensor,
    retain_logps: torch.Tensor,
    retain_n_tokens: torch.Tensor,
    retain_weight: float = 1.0,
) -> torch.Tensor:
    """Gradient difference (Liu et al., 2022): ascent on forget, descent on retain.

    ``L = -CE(forget) + retain_weight * CE(retain)``, both token-mean NLLs (:func:`ce_loss`).
    """
    return gradient_ascent_loss(forget_logps, forget_n_tokens) + retain_weight * ce_loss(retain_logps, retain_n_tokens)


def kl_sums(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Forward KL(p_ref || p_theta) of the next-token distributions, **summed** over each sequence's scored tokens.

    ``S_i = sum_{t in M_i} sum_v p_ref(v|<t) * (log p_ref(v|<t) - log p_theta(v|<t))``

    where ``M_i`` are the positions of sequence ``i`` whose *next* token is scored (the shift is
    done here, as in :func:`amendlm.scoring.sequence_logps`, so ``|M_i|`` is that function's
    ``n_tokens``): padding, prefix and start token never count, so a padded row cannot add KL.
    Computed in fp32.  Per-sequence sums (not logits) are what the trainer gathers across processes.

    Args:
        policy_logits: ``(batch, seq_len, vocab)`` policy outputs.
        reference_logits: ``(batch, seq_len, vocab)`` reference outputs (no gradient needed).
        loss_mask: ``(batch, seq_len)``, 1 where ``input_ids[:, t]`` is a scored token.

    Returns:
        ``(batch,)`` fp32 tensor (nats), 0 for a row without scored tokens.

    Raises:
        ValueError: the two logits or the mask differ in shape.
    """
    _check_same_shape(policy_logits=policy_logits, reference_logits=reference_logits)
    if loss_mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} does not match logits {tuple(policy_logits.shape)}")
    mask = loss_mask[:, 1:].bool()  # (batch, seq_len - 1): logits[:, t] predicts token t + 1
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=policy_logits.device)
    # (n_scored,) into (batch, seq_len - 1)
    per_token[mask] = token_kl(policy_logits[:, :-1][mask], reference_logits[:, :-1][mask])
    return per_token.sum(-1)


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p_theta) of each position's next-token distribution, in fp32.

    ``KL_t = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))`` with ``p = softmax(logits)``.

    Args:
        policy_logits: ``(n, vocab)`` policy logits of the scored positions.
        reference_logits: ``(n, vocab)`` reference logits of the same positions.

    Returns:
        ``(n,)`` fp32 tensor (nats), 0 where the two distributions agree.
    """
    policy = F.log_softmax(policy_logits.float(), dim=-1)  # (n, vocab)
    reference = F.log_softmax(reference_logits.float(), dim=-1)
    return (reference.exp() * (reference - policy)).sum(-1)


def kl_mean(kl_per_sequence: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """The token-mean KL of a batch from :func:`kl_sums`: ``sum_i S_i / sum_i |M_i|`` (nats per token).

    Args:
        kl_per_sequence: ``(batch,)`` summed KL of each sequence.
        n_tokens: ``(batch,)`` scored tokens of each sequence.

    Returns:
        scalar tensor; 0 (keeping the graph) when no token is scored.

    Raises:
        ValueError: mismatched shapes.
    """
    _check_same_shape(kl_per_sequence=kl_per_sequence, n_tokens=n_tokens)
    return kl_per_sequence.sum() / n_tokens.sum().clamp(min=1)


def kl_loss(
    policy_logits: torch.Tensor, reference_logits: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Forward KL(p_ref || p_theta) of the next-token distributions, mean over scored tokens.

    ``L = (1/|M|) * sum_{t in M} sum_v p_ref(v|<t) * (log p_ref(v|<t) - log p_theta(v|<t))``

    with ``M`` the scored positions of the whole batch (:func:`kl_sums` summed, divided by ``|M|``:
    :func:`kl_mean`).  Computed in fp32.

    Args:
        policy_logits: ``(batch, seq_len, vocab)`` policy outputs.
        reference_logits: ``(batch, seq_len, vocab)`` reference outputs (no gradient needed).
        loss_mask: ``(batch, seq_len)``, 1 where ``input_ids[:, t]`` is a scored token.

    Returns:
        scalar tensor (nats per token), 0 when the two distributions agree; 0 for an empty mask.

    Raises:
        ValueError: the two logits or the mask differ in shape.
    """
    sums = kl_sums(policy_logits, reference_logits, loss_mask)
    if not loss_mask[:, 1:].any():
        return policy_logits.sum() * 0.0
    return kl_mean(sums, loss_mask[:, 1:].sum(-1))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023, Eq. 7), mean over pairs.

    ``L = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])``

    For debiasing, chosen ``y_w`` = the anti-stereotype and rejected ``y_l`` = the stereotype of
    the same StereoSet context.  At ``pi = ref`` the loss is ``ln 2``.

    Args:
        *_logps: ``(batch,)`` summed log-probs of each continuation.
        beta: inverse temperature (0.1, as in the DPO paper).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
    )
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()
