"""The policy and the reference of an unlearning run.

* the **policy** is the model being trained: a PEFT LoRA adapter on the base model
  (:func:`attach_lora`, targets from :func:`lora_target_modules`) or the full model;
* the **reference** is the frozen base: with LoRA the same weights under
  :func:`amendlm.modeling.adapter_disabled` (one copy in memory), else a frozen deep copy
  (:func:`frozen_copy`, ``reference="copy"``).  :func:`reference_logits` runs it.
"""

from __future__ import annotations

import copy

import torch

from amendlm.modeling import adapter_disabled, autocast, eval_mode  # eval_mode: re-exported for callers of this module
from amendlm.unlearn.config import UnlearnConfig

_LINEAR_TYPES = ("Linear", "Conv1D")  # torch.nn.Linear, transformers' GPT-2 Conv1D
_NEVER_TARGET = ("lm_head", "embed_out", "wte", "wpe", "embed_tokens", "score")


def lora_target_modules(model) -> list[str]:
    """LoRA targets of any causal LM: the names of the linear layers inside its blocks.

    Collects the last name component of every ``Linear``/``Conv1D`` leaf (attention and MLP
    projections: ``q_proj ... down_proj`` for Llama/Qwen/Mistral, ``c_attn c_proj c_fc`` for
    GPT-2, ``query_key_value dense ...`` for GPT-NeoX) and leaves out the output head.

    Raises:
        ValueError: the model has no linear layers to adapt.
    """
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ in _LINEAR_TYPES and not list(module.children()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in _NEVER_TARGET:
                names.add(leaf)
    if not names:
        raise ValueError(f"no linear layers found for LoRA in {type(model).__name__}; pass target_modules")
    return sorted(names)


_ATTENTION_PARTS = ("attn", "attention")  # a path component naming an attention block


def attention_target_modules(model) -> list[str]:
    """LoRA targets on the attention projections only, as ``parent.leaf`` path suffixes.

    A ``Linear``/``Conv1D`` leaf counts when a component of its path *above* the leaf names an
    attention block (contains ``attn`` or ``attention``): GPT-2 ``attn.c_attn`` and
    ``attn.c_proj`` (its MLP's ``mlp.c_proj`` is left out, which the bare name ``c_proj`` would
    take), Llama/Qwen/Mistral/OPT ``self_attn.{q,k,v,o}_proj``, GPT-NeoX
    ``attention.query_key_value`` / ``attention.dense``.  PEFT matches a suffix against the full
    module path, so each names exactly the attention projections.

    Raises:
        ValueError: the model has no linear layer inside an attention block (pass target_modules).
    """
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ in _LINEAR_TYPES and not list(module.children()):
            parts = name.split(".")
            if len(parts) >= 2 and any(key in part.lower() for part in parts[:-1] for key in _ATTENTION_PARTS):
                names.add(".".join(parts[-2:]))
    if not names:
        raise ValueError(f"no attention projections found for LoRA in {type(model).__name__}; pass target_modules")
    return sorted(names)


def attach_lora(model, config: UnlearnConfig):
    """``model`` wrapped in a PEFT LoRA adapter of ``config`` (``lora_r``, ``lora_alpha``,
    ``lora_dropout``); only the adapter trains.  Targets: ``target_modules``, else by
    ``lora_scope``: :func:`lora_target_modules` (``all``) or :func:`attention_target_modules`.

    Raises:
        ValueError: no linear layers to adapt.
    """
    from peft import LoraConfig, get_peft_model

    detect = attention_target_modules if config.lora_scope == "attention" else lora_target_modules
    targets = config.target_modules or detect(model)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def frozen_copy(model):
    """A deep copy of ``model`` in eval mode with no parameter requiring a gradient (``reference="copy"``)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def reference_logits(model, inputs: dict, dtype: torch.dtype, reference_model=None) -> torch.Tensor:
    """Logits of the reference pass: eval mode, ``no_grad``, the run's autocast ``dtype``.

    The reference is the *frozen* base, so it runs with dropout off (:func:`eval_mode`) even
    while the policy trains; the caller's train/eval modes are restored afterwards.  Two calls
    on the same inputs return the same logits.

    Args:
        model: the unwrapped policy (a PEFT model: its adapter is disabled for this pass, and
            re-enabled afterwards even on an exception).  Ignored when ``reference_model`` is given.
        inputs: ``input_ids`` and ``attention_mask``, each ``(batch, seq_len)``.
        dtype: ``torch.float32`` or ``torch.bfloat16`` (autocast on the inputs' device).
        reference_model: a frozen copy of the base (``reference="copy"``), or None.

    Returns:
        ``(batch, seq_len, vocab)`` logits.
    """
    device = inputs["input_ids"].device
    reference = model if reference_model is None else reference_model
    with torch.no_grad(), autocast(dtype, device), eval_mode(reference):
        if reference_model is not None:
            return reference_model(**inputs, use_cache=False).logits
        with adapter_disabled(model):
            return model(**inputs, use_cache=False).logits
