"""RAM decoding rules: pure maps ``(proposal_logits, aligner_logits) -> logits`` for one step.

The aligned model of RAM (arXiv:2505.19700, Sec. 3) is ``P(y|x) = P_M(y|x) Q(y|x) / Z(x)``: ``P_M`` the
frozen *proposal* model, ``Q`` the small *aligner* sharing its vocabulary.  Decoding it token by token
("Proposing - Aligning - Reducing") needs, at every step, one next-token distribution built from the
two models' logits.  Each mode below is that construction and nothing else: no model, no cache, no
loop (the loop is :mod:`amendlm.ram.generate`).  The returned logits are sampled as they are
(softmax + multinomial) or taken greedily (argmax); tokens a rule excludes are ``-inf``.  The
resampling modes (``sir``, ``sir-best``) make their random draws themselves and return the chosen
token alone, so a greedy loop and a sampling loop pick the same token: they stay seeded random
draws in a greedy evaluation.

Shapes: every logits tensor is ``(batch, vocab)``, already sliced to the tokenizer's vocabulary.
Probabilities are natural-log.  No returned row is ever all ``-inf`` (a rule whose own construction
would empty a row falls back to the proposal's nucleus for that row), so sampling never sees NaN.

Modes (names as in the paper and its public code):

* ``par``    aligner logits restricted to the proposal's top-p nucleus, then aligner top-p; optional
             EOS priority (if the proposal's argmax is EOS, emit EOS).  Public code's rule.
* ``par-kl`` per row, ``par`` unless ``KL(P_M || Q) > kl_threshold``, then the proposal's nucleus.
             Public code's default.
* ``sir``    sampling-importance-resampling (paper): draw ``candidates`` tokens from the
             proposal's nucleus, weight each by ``Q``, resample one (a random draw, also when the
             loop is greedy).
* ``sir-best`` "best of n", *not* the paper's SIR: the same ``candidates`` proposal draws, then the
             candidate the aligner likes most (argmax of ``Q`` over the drawn tokens).
* ``mds``    product of experts ``softmax(p / T_p) * softmax(a / T_a)``, normalised.
* ``proposal`` / ``aligner``  one model alone (the baselines; the other model is not run).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from amendlm.ram.masks import NEG_INF, masked, top_k_mask, top_p_mask  # noqa: F401 (re-exported)


@dataclass
class DecodeConfig:
    """Parameters of a decoding rule (saved beside every generation as JSON).

    Attributes:
        mode: a key of :data:`MODES` (``par``, ``par-kl``, ``sir``, ``sir-best``, ``mds``, ``proposal``,
            ``aligner``).
            Default ``par-kl``, the public code's default.
        proposal_temperature: ``T_p`` dividing proposal logits. 1.0 (public code).
        aligner_temperature: ``T_a`` dividing aligner logits. 1.0 (public code).
        proposal_top_p: nucleus of the proposal that bounds the support. 0.95 (public code).
        proposal_top_k: keep only the proposal's k most likely tokens before top-p; 0 = off.
        aligner_top_p: top-p applied to the aligner's renormalised distribution in ``par``/``aligner``.
            0.9 (public code); 1.0 = off.
        kl_threshold: ``par-kl`` switches a row to the proposal when ``KL(P_M||Q)`` (nats) exceeds it. 0.1.
        candidates: number of proposal draws per step in ``sir`` / ``sir-best`` (with replacement). 8.
        eos_priority: in ``par``/``par-kl``, emit EOS whenever the proposal's argmax is EOS (public code).
        repetition_penalty: CTRL-style penalty (>1 discourages) applied by the loop to each model's
            logits of tokens already in the row; 1.0 = off.  Official sampling used 1.05.
    """

    mode: str = "par-kl"
    proposal_temperature: float = 1.0
    aligner_temperature: float = 1.0
    proposal_top_p: float = 0.95
    proposal_top_k: int = 0
    aligner_top_p: float = 0.9
    kl_threshold: float = 0.1
    candidates: int = 8
    eos_priority: bool = True
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.mode = self.mode.lower()
        get_mode(self.mode)
        for name in ("proposal_temperature", "aligner_temperature", "repetition_penalty"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("proposal_top_p", "aligner_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.proposal_top_k < 0:
            raise ValueError(f"proposal_top_k must be >= 0 (0 = off), got {self.proposal_top_k}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.kl_threshold < 0:
            raise ValueError(f"kl_threshold must be >= 0, got {self.kl_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- nucleus, divergence (pure; masks in amendlm.ram.masks)

def proposal_nucleus_logits(proposal_logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """``proposal_logits / T_p`` restricted to top-k (if set) then top-p: sampling the proposal alone.

    Returns ``(batch, vocab)`` fp32; every row has at least one finite entry.
    """
    scaled = _scaled(proposal_logits, config.proposal_temperature)
    if config.proposal_top_k > 0:
        scaled = masked(scaled, top_k_mask(scaled, config.proposal_top_k))
    return masked(scaled, top_p_mask(scaled, config.proposal_top_p))


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p) || softmax(q))`` per row, in nats; ``(batch, vocab)`` x2 -> ``(batch,)``."""
    p_logps = p_logits.float().log_softmax(-1)
    q_logps = q_logits.float().log_softmax(-1)
    terms = p_logps.exp() * (p_logps - q_logps)
    return terms.nan_to_num(0.0, posinf=float("inf")).sum(-1)  # 0 * log 0 = 0


def _eos_only(logits: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    out = torch.full_like(logits, NEG_INF)
    out[:, eos_token_id] = 0.0
    return out


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in fp32 (``logits`` itself when both already hold: no copy)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


Made = torch.Tensor | Callable[[], torch.Tensor]


def _rows_where(rows: torch.Tensor, chosen: Made, otherwise: Made) -> torch.Tensor:
    """``torch.where(rows, chosen, otherwise)`` for a ``(batch, 1)`` bool ``rows`` and two ``(batch, vocab)``
    tensors, each possibly given as a function making it.  On the CPU a side no row takes is not made
    (and no ``where`` runs when every row takes one side); elsewhere both are made (no synchronisation)."""
    def made(x: Made) -> torch.Tensor:
        return x() if callable(x) else x

    if rows.device.type == "cpu":
        if not bool(rows.any()):
            return made(otherwise)
        if bool(rows.all()):
            return made(chosen)
    return torch.where(rows, made(chosen), made(otherwise))


def _nonempty(logits: torch.Tensor, fallback: Made) -> torch.Tensor:
    """Replace rows of ``logits`` that are all ``-inf`` (or contain NaN) by the same rows of ``fallback``
    (a tensor or a function making it, :func:`_rows_where`)."""
    bad = ~torch.isfinite(logits).any(-1, keepdim=True) | torch.isnan(logits).any(-1, keepdim=True)
    return _rows_where(bad, fallback, logits)


# ----------------------------------------------------------------------------- rules (pure)

def rule_proposal(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """The proposal alone: its top-k / top-p nucleus at temperature ``T_p``."""
    return proposal_nucleus_logits(proposal_logits, config)


def rule_aligner(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """The aligner alone: ``aligner_logits / T_a`` restricted to its own top-p (``aligner_top_p``)."""
    scaled = _scaled(aligner_logits, config.aligner_temperature)

    def fallback():
        return torch.zeros_like(scaled) if proposal_logits is None else proposal_nucleus_logits(proposal_logits, config)
    return _nonempty(masked(scaled, top_p_mask(scaled, config.aligner_top_p)), fallback)


def rule_par(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """PAR (public code): aligner logits on the proposal's nucleus, ``-inf`` elsewhere, then aligner top-p.

    With ``aligner_top_p = 1`` the softmax of the result is exactly ``Q`` renormalised on the
    proposal's nucleus.  With ``eos_priority`` and ``eos_token_id`` set, rows whose proposal argmax is
    EOS become EOS-only.
    """
    return _par(proposal_logits, aligner_logits, proposal_nucleus_logits(proposal_logits, config), config, eos_token_id)


def _par(proposal_logits, aligner_logits, nucleus, config, eos_token_id):
    aligned = masked(_scaled(aligner_logits, config.aligner_temperature), torch.isfinite(nucleus))
    if config.aligner_top_p < 1.0:
        aligned = masked(aligned, top_p_mask(aligned, config.aligner_top_p))
    aligned = _nonempty(aligned, nucleus)
    if config.eos_priority and eos_token_id is not None:
        proposal_eos = (proposal_logits.argmax(-1) == eos_token_id).unsqueeze(-1)
        aligned = _rows_where(proposal_eos, lambda: _eos_only(aligned, eos_token_id), aligned)
    return aligned


def par_kl_fallback(proposal_logits: torch.Tensor, aligner_logits: torch.Tensor, config: DecodeConfig) -> torch.Tensor:
    """Rows where PAR-KL falls back to the proposal: ``KL(P_M || Q) > kl_threshold``.

    KL (nats) between the full-vocabulary distributions at temperatures ``T_p`` and ``T_a``.
    ``(batch, vocab)`` x2 -> ``(batch,)`` bool.
    """
    kl = kl_divergence(_scaled(proposal_logits, config.proposal_temperature),
                       _scaled(aligner_logits, config.aligner_temperature))
    return kl > config.kl_threshold


def rule_par_kl(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """PAR-KL (public code's default): per row, PAR unless ``KL(P_M || Q) > kl_threshold``; then the
    proposal's nucleus (the aligner is trusted only where it stays close to the proposal).

    KL is taken between the full-vocabulary distributions at temperatures ``T_p`` and ``T_a``
    (:func:`par_kl_fallback`).
    """
    use_proposal = par_kl_fallback(proposal_logits, aligner_logits, config).unsqueeze(-1)
    nucleus = proposal_nucleus_logits(proposal_logits, config)
    return _rows_where(use_proposal, nucleus, lambda: _par(proposal_logits, aligner_logits, nucleus, config, eos_token_id))


def _candidates(proposal_logits, aligner_logits, config, generator):
    """``n`` proposal draws per row: ``(counts, aligner_logps)``, both ``(batch, vocab)``; ``counts[v]`` =
    times ``v`` was drawn from the proposal's nucleus (with replacement), ``aligner_logps`` = ``log Q`` at ``T_a``."""
    nucleus = proposal_nucleus_logits(proposal_logits, config)
    draws = torch.multinomial(nucleus.softmax(-1), config.candidates, replacement=True, generator=generator)
    counts = torch.zeros_like(nucleus).scatter_add_(-1, draws, torch.ones_like(draws, dtype=nucleus.dtype))
    return counts, _scaled(aligner_logits, config.aligner_temperature).log_softmax(-1)


def _only(token_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Logits ``(batch, vocab)`` with ``token_ids`` ``(batch,)`` at 0 and every other token ``-inf``."""
    return torch.full_like(like, NEG_INF).scatter_(-1, token_ids.unsqueeze(-1), 0.0)


def sir_weights(counts: torch.Tensor, aligner_logps: torch.Tensor) -> torch.Tensor:
    """SIR's self-normalised resampling logits: ``log c_v + log Q(v)`` on drawn tokens, ``-inf`` elsewhere.

    ``softmax`` of the result is ``c_v Q(v) / sum_u c_u Q(u)`` (arXiv:2505.19700, Sec. 3.2).  A row whose
    drawn tokens all have ``Q = 0`` falls back to the counts alone.  ``(batch, vocab)`` x2 -> ``(batch, vocab)``.
    """
    weighted = masked(counts.log() + aligner_logps, counts > 0)
    return _nonempty(weighted, masked(counts.log(), counts > 0))


def rule_sir(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """SIR (paper): ``n`` proposal draws weighted by ``Q``, self-normalised, resampled once.

    Draws ``n = config.candidates`` tokens with replacement from the proposal's nucleus; a token drawn
    ``c_v`` times gets weight ``c_v * Q(v)`` (``Q`` at temperature ``T_a``, :func:`sir_weights`), and one
    token is resampled with probability ``c_v Q(v) / sum_u c_u Q(u)``, so
    ``P(v) = E[c_v Q(v) / sum_u c_u Q(u)]``; as ``n -> inf`` this tends to ``P_M Q / Z`` on the nucleus.
    Both draws use ``generator`` (pass a seeded one for reproducible runs).  Returns logits with the
    resampled token at 0 and every other token ``-inf``: argmax and a softmax draw both give it, so SIR
    stays a random draw in a greedy loop (the argmax of the weights would be "best of n", ``sir-best``).
    """
    counts, aligner_logps = _candidates(proposal_logits, aligner_logits, config, generator)
    weights = sir_weights(counts, aligner_logps)
    chosen = torch.multinomial(weights.softmax(-1), 1, generator=generator).squeeze(-1)
    return _only(chosen, weights)


def rule_sir_best(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """Best of n (not the paper's SIR): the same ``n`` proposal draws as ``sir``, then the drawn token with
    the highest ``Q(v)`` (ties: the lowest id).  Random through the draws only (``generator``).
    Returns that token alone (0; ``-inf`` elsewhere)."""
    counts, aligner_logps = _candidates(proposal_logits, aligner_logits, config, generator)
    best = masked(aligner_logps, counts > 0)
    best = _nonempty(best, masked(counts.log(), counts > 0))
    return _only(best.argmax(-1), best)


def rule_mds(proposal_logits, aligner_logits, config, eos_token_id=None, generator=None):
    """MDS: product of experts ``softmax(p / T_p) * softmax(a / T_a)``, returned as normalised log-probs."""
    product = (_scaled(proposal_logits, config.proposal_temperature).log_softmax(-1)
               + _scaled(aligner_logits, config.aligner_temperature).log_softmax(-1))
    return _nonempty(product.log_softmax(-1), lambda: proposal_nucleus_logits(proposal_logits, config))


# ----------------------------------------------------------------------------- registry

Rule = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DecodingMode:
    """A registered decoding rule and which models it needs stepped."""

    name: str
    rule: Rule
    uses_proposal: bool
    uses_aligner: bool
    stochastic: bool  # draws random numbers itself (needs a generator)
    summary: str


MODES: dict[str, DecodingMode] = {
    mode.name: mode
    for mode in (
        DecodingMode("par", rule_par, True, True, False, "aligner on the proposal's nucleus (public code)"),
        DecodingMode("par-kl", rule_par_kl, True, True, False, "PAR, proposal where KL(P_M||Q) > threshold"),
        DecodingMode("sir", rule_sir, True, True, True, "n proposal draws resampled by aligner weight (paper)"),
        DecodingMode("sir-best", rule_sir_best, True, True, True, "best of n: the drawn token the aligner likes most"),
        DecodingMode("mds", rule_mds, True, True, False, "normalised product of both distributions"),
        DecodingMode("proposal", rule_proposal, True, False, False, "the proposal model alone"),
        DecodingMode("aligner", rule_aligner, False, True, False, "the aligner model alone"),
    )
}


def get_mode(name: str) -> DecodingMode:
    """Look up a decoding mode by name (case-insensitive).

    Raises:
        KeyError: unknown name; the message lists the valid ones and the closest match.
    """
    key = name.lower()
    if key not in MODES:
        close = difflib.get_close_matches(key, MODES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown decoding mode '{name}'; choose one of {', '.join(MODES)}.{hint}")
    return MODES[key]


def apply_rule(
    proposal_logits: torch.Tensor | None,
    aligner_logits: torch.Tensor | None,
    config: DecodeConfig,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run ``config.mode``'s rule on one step's logits.

    Args:
        proposal_logits: ``(batch, vocab)`` or ``None`` when the mode does not use the proposal.
        aligner_logits: ``(batch, vocab)`` or ``None`` when the mode does not use the aligner.
        eos_token_id: enables EOS priority in ``par``/``par-kl``.
        generator: random source of stochastic modes (``sir``, ``sir-best``).

    Returns:
        ``(batch, vocab)`` fp32 logits; every row has a finite entry.

    Raises:
        ValueError: a logits tensor the mode needs is missing, or the two widths differ.
    """
    mode = get_mode(config.mode)
    if mode.uses_proposal and proposal_logits is None:
        raise ValueError(f"mode '{mode.name}' needs proposal logits")
    if mode.uses_aligner and aligner_logits is None:
        raise ValueError(f"mode '{mode.name}' needs aligner logits")
    if proposal_logits is not None and aligner_logits is not None and proposal_logits.shape != aligner_logits.shape:
        raise ValueError(
            f"proposal logits {tuple(proposal_logits.shape)} and aligner logits {tuple(aligner_logits.shape)} differ; "
            "slice both to the shared tokenizer's vocabulary first"
        )
    return mode.rule(proposal_logits, aligner_logits, config, eos_token_id=eos_token_id, generator=generator)


def repetition_penalty(logits: torch.Tensor, seen_mask: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019; as in transformers): for tokens already seen in the
    row, positive logits are divided by ``penalty`` and negative ones multiplied by it.

    Args:
        logits: ``(batch, vocab)``; seen_mask: ``(batch, vocab)`` bool; penalty: > 0 (1.0 = identity).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen_mask, penalised, logits)


def pick_tokens(logits: torch.Tensor, greedy: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row: argmax when ``greedy``, else one softmax draw. ``(batch, vocab) -> (batch,)``."""
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(logits.float().softmax(-1), 1, generator=generator).squeeze(-1)

