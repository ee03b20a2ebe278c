"""The unlearning methods: each one is a set of data streams plus a loss over their log-probs.

A method never sees a model.  The trainer runs the policy (and, where needed, the reference)
on one batch of each stream the method declares and hands the results over as
:class:`StreamOutput` records; the method combines the pure losses of
:mod:`amendlm.unlearn.losses`.  Adding a method = a loss function + a :func:`register` call
+ a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from amendlm.unlearn import losses

STREAMS = ("forget", "retain", "kl", "chosen", "rejected")


@dataclass
class StreamOutput:
    """Model outputs for one batch of one stream.

    Every field is a ``(batch,)`` tensor (so the trainer can gather a global batch from several
    processes): ``policy_logps`` / ``reference_logps`` summed continuation log-probs,
    ``n_tokens`` the scored tokens, and for the ``kl`` stream ``kl_sums``, each sequence's summed
    KL(reference || policy) over those tokens (:func:`amendlm.unlearn.losses.kl_sums`).
    """

    policy_logps: torch.Tensor
    n_tokens: torch.Tensor
    reference_logps: torch.Tensor | None = None
    kl_sums: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "StreamOutput":
        """The same record with ``fn`` applied to every tensor present (e.g. slicing, gathering)."""
        return StreamOutput(*(None if t is None else fn(t) for t in
                              (self.policy_logps, self.n_tokens, self.reference_logps, self.kl_sums)))


@dataclass(frozen=True)
class LossWeights:
    """Hyper-parameters a loss function may read (filled from :class:`UnlearnConfig`)."""

    forget: float = 0.5
    retain: float = 0.3
    kl: float = 0.2
    npo_beta: float = 0.1
    npo_reduction: str = "sequence"
    dpo_beta: float = 0.1
    ce_reduction: str = "token"


LossFn = Callable[[Mapping[str, StreamOutput], LossWeights], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: CLI name.
        streams: the data streams of each step (``forget``, ``retain``, ``kl``, ``chosen``/``rejected``).
        reference_streams: streams that also need the reference pass.
        adversarial: adds the adversarial share of anti-stereotypes to the forget set.
        dynamic_swap: evaluates, swaps and stops by the BiasUnlearn schedule.
        loss: ``(outputs, weights) -> (scalar loss, named detached scalar parts for the log)``.
        summary: one line for ``--help`` and error messages.
    """

    name: str
    streams: tuple[str, ...]
    reference_streams: tuple[str, ...]
    adversarial: bool
    dynamic_swap: bool
    loss: LossFn
    summary: str


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is already registered")
    unknown = [s for s in method.streams + method.reference_streams if s not in STREAMS]
    if unknown:
        raise ValueError(f"method '{method.name}': unknown streams {unknown}; valid: {', '.join(STREAMS)}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name.

    Raises:
        ValueError: unknown name (lists the registered ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; valid: {', '.join(METHODS)}") from None


def _npo(out: StreamOutput, w: LossWeights) -> torch.Tensor:
    return losses.npo_loss(out.policy_logps, out.reference_logps, w.npo_beta, out.n_tokens, w.npo_reduction)


def _ce(out: StreamOutput, w: LossWeights) -> torch.Tensor:
    return losses.ce_loss(out.policy_logps, out.n_tokens, w.ce_reduction)


def _kl(out: StreamOutput) -> torch.Tensor:
    return losses.kl_mean(out.kl_sums, out.n_tokens)


def biasunlearn_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BiasUnlearn: ``w.forget * NPO(forget) + w.retain * CE(retain) + w.kl * KL(kl)`` (DESIGN.md §4)."""
    forget = _npo(o["forget"], w)
    retain = _ce(o["retain"], w)
    kl = _kl(o["kl"])
    total = w.forget * forget + w.retain * retain + w.kl * kl
    return total, {"forget": forget.detach(), "retain": retain.detach(), "kl": kl.detach()}


def npo_only_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Baseline: NPO on the stereotype set alone (no retain, no KL, no swapping)."""
    forget = _npo(o["forget"], w)
    return forget, {"forget": forget.detach()}


def gradascent_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Baseline: gradient ascent on the stereotype set (token-mean NLL maximised)."""
    forget = -_ce(o["forget"], w)
    return forget, {"forget": forget.detach()}


def graddiff_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Baseline: ascent on stereotypes + descent on anti-stereotypes, with BiasUnlearn's weights."""
    forget, retain = -_ce(o["forget"], w), _ce(o["retain"], w)
    return w.forget * forget + w.retain * retain, {"forget": forget.detach(), "retain": retain.detach()}


def dpo_pair_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Baseline: DPO with chosen = anti-stereotype, rejected = stereotype of the same context."""
    chosen, rejected = o["chosen"], o["rejected"]
    loss = losses.dpo_loss(chosen.policy_logps, rejected.policy_logps, chosen.reference_logps, rejected.reference_logps, w.dpo_beta)
    return loss, {"dpo": loss.detach()}


def dpo_swap_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO with BiasUnlearn's control: ``w.forget * DPO(chosen, rejected) + w.retain * CE(chosen) + w.kl * KL(kl)``.

    The pairs are those of the current focus and swap state (:func:`amendlm.unlearn.data.build_sets`):
    chosen = anti-stereotype, rejected = stereotype of the same context, exchanged for a focus
    bias type whose val SS fell below 50.  Tokens the two sides share with the same context
    (" She is a") have the same log-prob on both sides and cancel in DPO's difference, so, unlike
    NPO + CE, the pairwise term does not pull both sides on them.  ``CE(chosen)`` is the token-mean
    NLL of the chosen side (set ``alpha_retain`` 0 to drop it); ``KL`` keeps neutral text close to
    the reference, as in BiasUnlearn.
    """
    chosen, rejected = o["chosen"], o["rejected"]
    dpo = losses.dpo_loss(chosen.policy_logps, rejected.policy_logps, chosen.reference_logps, rejected.reference_logps, w.dpo_beta)
    retain = _ce(chosen, w)
    kl = _kl(o["kl"])
    total = w.forget * dpo + w.retain * retain + w.kl * kl
    return total, {"dpo": dpo.detach(), "retain": retain.detach(), "kl": kl.detach()}


def sft_anti_loss(o: Mapping[str, StreamOutput], w: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Baseline: supervised fine-tuning (CE) on anti-stereotypes only."""
    retain = _ce(o["retain"], w)
    return retain, {"retain": retain.detach()}


register(Method("biasunlearn", ("forget", "retain", "kl"), ("forget", "kl"), True, True, biasunlearn_loss,
                "NPO forget + CE retain + KL, adversarial forget set, dynamic swapping (arXiv:2509.25673)"))
register(Method("npo", ("forget",), ("forget",), False, False, npo_only_loss, "NPO on stereotypes only"))
register(Method("gradascent", ("forget",), (), False, False, gradascent_loss, "gradient ascent on stereotypes"))
register(Method("graddiff", ("forget", "retain"), (), False, False, graddiff_loss,
                "ascent on stereotypes + CE on anti-stereotypes"))
register(Method("dpo", ("chosen", "rejected"), ("chosen", "rejected"), False, False, dpo_pair_loss,
                "DPO, chosen = anti-stereotype, rejected = stereotype"))
register(Method("sft-anti", ("retain",), (), False, False, sft_anti_loss, "CE on anti-stereotypes only"))
register(Method("dpo-swap", ("chosen", "rejected", "kl"), ("chosen", "rejected", "kl"), False, True, dpo_swap_loss,
                "DPO on (anti-stereotype, stereotype) pairs + CE on the chosen side + KL, with BiasUnlearn's "
                "per-type focus, swapping and stop rule"))
