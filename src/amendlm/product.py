"""A proposal x aligner pair scored as one causal LM: the distribution of RAM's ``mds`` rule.

For every position ``t`` the pair's next-token distribution is

    p(y_t | y_<t) = softmax(b_t / T_b + a_t / T_e)                                    (1)

with ``b_t`` and ``a_t`` the proposal's and the aligner's logits sliced to the shared tokenizer's
vocabulary (padded embedding rows get no mass) and normalised over that whole vocabulary.  It is
the normalised product of experts ``softmax(b/T_b) * softmax(a/T_e)`` that
:func:`amendlm.ram.decoding.rule_mds` samples (RAM, arXiv:2505.19700, Sec. 3: ``P_M * Q / Z``
applied token by token), so scoring it is exact: every token has a finite log-prob.

:class:`ProductLM` wraps both models as one ``torch.nn.Module`` whose ``forward`` runs the
proposal once and the aligner once on the same inputs (padded or shared-prefix packed) and
returns the logits of (1).  The scorer (:mod:`amendlm.scoring`) takes it wherever it takes a
model, so every benchmark, batching and packing path is the single scorer's; a plain model is
scored exactly as before (nothing here runs).

The nucleus-restricted rules (``par``, ``par-kl``) are not scored: they put zero mass outside
the proposal's top-p nucleus, so a continuation token outside it has log-prob -inf and StereoSet
scores and perplexity are undefined / infinite; ``sir`` is a random draw, not a distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def product_logits(proposal_logits: torch.Tensor, aligner_logits: torch.Tensor, vocab_size: int,
                   proposal_temperature: float = 1.0, aligner_temperature: float = 1.0) -> torch.Tensor:
    """Logits of the pair's distribution, eq. (1): ``b[..., :V] / T_b + a[..., :V] / T_e``.

    Args:
        proposal_logits: ``(..., >= V)`` proposal logits ``b`` (any float dtype; rows past ``V`` are
            padded embedding rows and are dropped).
        aligner_logits: ``(..., >= V)`` aligner logits ``a``, same leading shape.
        vocab_size: ``V``, the shared tokenizer's length (:func:`amendlm.ram.generate.shared_vocab_size`).
        proposal_temperature, aligner_temperature: ``T_b``, ``T_e`` > 0.

    Returns:
        ``(..., V)`` fp32 logits; ``log_softmax`` of them is ``log p`` of eq. (1) (natural log), the
        same distribution as ``rule_mds`` (which adds per-row constants only).  Normalised over the
        ``V`` shared tokens only: a proposal whose output matrix is padded wider than its tokenizer
        (e.g. Qwen2.5, 151,936 rows for 151,665 tokens) is scored alone over all its rows, so there a
        constant aligner gives the proposal's scores up to the (tiny) mass of the padding rows.

    Raises:
        ValueError: either tensor has fewer than ``V`` columns, or a temperature is not > 0.
    """
    if proposal_temperature <= 0 or aligner_temperature <= 0:
        raise ValueError(f"temperatures must be > 0, got T_b={proposal_temperature}, T_e={aligner_temperature}")
    for name, logits in (("proposal", proposal_logits), ("aligner", aligner_logits)):
        if logits.shape[-1] < vocab_size:
            raise ValueError(f"{name} logits have {logits.shape[-1]} columns, fewer than the vocabulary's {vocab_size}")
    proposal = proposal_logits[..., :vocab_size].float()
    if proposal_temperature != 1.0:
        proposal = proposal / proposal_temperature
    aligner = aligner_logits[..., :vocab_size].to(device=proposal.device, dtype=torch.float32)
    return torch.add(proposal, aligner, alpha=1.0 / aligner_temperature)


@dataclass
class ProductOutput:
    """What :meth:`ProductLM.forward` returns: ``logits`` ``(batch, seq_len, V)`` fp32, eq. (1)."""

    logits: torch.Tensor


class ProductLM(torch.nn.Module):
    """A proposal and an aligner sharing one tokenizer, called like one causal LM (eq. (1)).

    Args:
        proposal: causal LM ``b`` (``transformers`` or PEFT-wrapped; e.g. with a BiasUnlearn adapter).
        aligner: causal LM ``a`` with the same tokenizer (its output matrix may be padded wider).
        vocab_size: the shared tokenizer's length ``V``.
        proposal_temperature, aligner_temperature: ``T_b``, ``T_e`` (1.0: the plain product).

    ``forward`` accepts what the scorer passes a model (``input_ids``, ``attention_mask`` 2-D or a
    4-D additive packing mask, ``position_ids``, ``use_cache``) and gives both models the same
    inputs; a 4-D mask is rebuilt in the aligner's dtype when the two dtypes differ.  ``modules()``
    holds both models, so :func:`amendlm.modeling.eval_mode` covers both; the first parameter is the
    proposal's (the scorer takes its device and mask dtype from it).

    Raises:
        ValueError: ``vocab_size`` < 1 or a temperature not > 0.
    """

    def __init__(self, proposal, aligner, vocab_size: int, proposal_temperature: float = 1.0,
                 aligner_temperature: float = 1.0):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if proposal_temperature <= 0 or aligner_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got T_b={proposal_temperature}, T_e={aligner_temperature}")
        self.proposal, self.aligner = proposal, aligner
        self.vocab_size = vocab_size
        self.proposal_temperature, self.aligner_temperature = proposal_temperature, aligner_temperature

    @property
    def component_models(self) -> tuple:
        """``(proposal, aligner)``: what :func:`amendlm.scoring.check_packing_support` checks."""
        return self.proposal, self.aligner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> ProductOutput:
        """Run both models once on the same ``(batch, seq_len)`` inputs; logits ``(batch, seq_len, V)`` of eq. (1)."""
        proposal_logits = self.proposal(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, **kwargs).logits
        parameter = next(self.aligner.parameters(), None)
        device = parameter.device if parameter is not None else input_ids.device
        mask = attention_mask
        if mask is not None and mask.is_floating_point() and parameter is not None and mask.dtype != parameter.dtype:
            blocked = mask < 0  # the additive packing mask: 0 where attending, the dtype's minimum elsewhere
            mask = torch.zeros(mask.shape, dtype=parameter.dtype, device=mask.device).masked_fill_(
                blocked, torch.finfo(parameter.dtype).min)
        aligner_logits = self.aligner(input_ids=input_ids.to(device), attention_mask=_to(mask, device),
                                      position_ids=_to(position_ids, device), **kwargs).logits
        return ProductOutput(product_logits(proposal_logits, aligner_logits, self.vocab_size,
                                            self.proposal_temperature, self.aligner_temperature))

    def settings(self) -> dict:
        """The distribution's parameters as data: ``rule`` (``mds``), ``vocab_size``, both temperatures."""
        return {"rule": "mds", "vocab_size": self.vocab_size, "proposal_temperature": self.proposal_temperature,
                "aligner_temperature": self.aligner_temperature}


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


@dataclass
class AlignerConfig:
    """The aligner of a scored pair (``amendlm eval --aligner``).

    Attributes:
        aligner: an aligner directory, a run directory of ``amendlm align train`` holding
            ``aligner/`` (:func:`amendlm.ram.api.resolve_aligner`), an embedded model name or a hub id.
        proposal_temperature: ``T_b`` of eq. (1). 1.0 (the plain product ``P_M * Q``).
        aligner_temperature: ``T_e`` of eq. (1). 1.0.
    """

    aligner: str
    proposal_temperature: float = 1.0
    aligner_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not str(self.aligner).strip():
            raise ValueError("aligner must name a model")
        for name in ("proposal_temperature", "aligner_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_aligner(config: AlignerConfig) -> str:
    """Resolve the aligner's path without loading it (a wrong local path fails before any model loads).

    Returns:
        The aligner as :func:`amendlm.modeling.load_model` should be given it (an ``align train`` run
        directory becomes its ``aligner/``; :func:`amendlm.ram.api.resolve_aligner`).

    Raises:
        FileNotFoundError, ValueError: one line naming ``--aligner`` and the path.
    """
    from amendlm.ram.api import resolve_aligner

    return resolve_aligner(config.aligner, "--aligner")


def load_product(proposal, tokenizer, config: AlignerConfig, proposal_name: str = "proposal", device: str = "cpu",
                 trust_remote_code: bool = False) -> ProductLM:
    """Load ``config.aligner`` and pair it with the loaded ``proposal`` (its ``tokenizer`` is the shared one).

    Raises:
        FileNotFoundError, OSError: as :func:`amendlm.modeling.load_model`.
        ValueError: the aligner's tokenizer differs from the proposal's, or a model has fewer output
            rows than the tokenizer has tokens (:func:`amendlm.ram.generate.shared_vocab_size`, names both).
    """
    from amendlm.modeling import load_model
    from amendlm.ram.generate import shared_vocab_size

    aligner, aligner_tokenizer = load_model(check_aligner(config), device=device, trust_remote_code=trust_remote_code)
    vocab_size = shared_vocab_size(tokenizer, aligner_tokenizer, proposal_name, config.aligner, proposal, aligner)
    return ProductLM(proposal, aligner, vocab_size, config.proposal_temperature, config.aligner_temperature)


def aligner_record(product: ProductLM) -> dict:
    """What a results file stores about the aligner of a scored pair.

    Returns:
        ``{"aligner": name as given, "aligner_path": the directory loaded, "rule": "mds",
        "vocab_size", "proposal_temperature", "aligner_temperature", "weights":
        :func:`amendlm.provenance.weights_record` of the aligner}``.
    """
    from amendlm.provenance import weights_record

    sources = getattr(product.aligner, "amendlm_sources", None) or {}
    name = sources.get("model") or getattr(product.aligner, "name_or_path", None)
    return {"aligner": name, "aligner_path": sources.get("model_path") or name, **product.settings(),
            "weights": weights_record(product.aligner)}
