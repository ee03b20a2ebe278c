"""The initial aligner of ``align train``: a model, or the proposal's first K blocks; optionally a zero head; full or LoRA.

* :func:`truncate_to_layers` cuts a decoder to its first ``K`` blocks (embeddings, final norm and LM
  head kept): the small aligner built from the proposal itself.
* :func:`zero_output_head` sets the aligner's output matrix to zero (untying it from the input
  embeddings first when the two are shared, as in SmolLM2 and Gemma 3).  The aligner's logits are then
  0 for every token at every position, so the pair's distribution ``softmax(b/T_b + a/T_e)``
  (:mod:`amendlm.product`) *is* the proposal's: training starts exactly at the proposal and moves
  away from it only as far as the loss asks.  Without it, a cut copy of the proposal multiplied with
  the proposal sharpens the distribution (roughly ``P_M^2``) before any training.
* :func:`build_aligner` puts it together.  With LoRA and a zero head, the head gets a LoRA adapter
  too: a frozen zero head would pass no gradient to anything before it, while ``0 + B A`` (``B``
  zero at init, as LoRA starts) learns a rank-``r`` logit correction from the first step.
"""

from __future__ import annotations

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD_NAME = "lm_head"


def truncate_to_layers(model, k: int):
    """Keep the first ``k`` decoder blocks of a decoder-only model in place (embeddings, final norm and
    LM head kept); returns the model.

    Raises:
        ValueError: the model has no ``model.layers`` list, or fewer than ``k`` blocks.
    """
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find decoder blocks at model.layers to truncate")
    if k > len(layers):
        raise ValueError(f"cannot keep {k} layers of a model with {len(layers)}")
    base.layers = torch.nn.ModuleList(list(layers)[:k])
    model.config.num_hidden_layers = k
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:k]
    return model


def zero_output_head(model):
    """Give ``model`` an all-zero output matrix of its own; returns the model.

    A head tied to the input embeddings is replaced by a new zero ``Linear`` of the same shape
    (``(vocab, hidden)``, no bias) and ``config.tie_word_embeddings`` is set to False, so the input
    embeddings keep their values and the saved model reloads untied.  An untied head is zeroed in
    place (a bias, if any, too).  Afterwards ``model(...).logits`` is exactly 0 everywhere.

    Raises:
        ValueError: the model has no ``torch.nn.Linear`` output head.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{type(model).__name__}: no linear output head to zero (found {type(head).__name__})")
    embeddings = model.get_input_embeddings()
    tied = embeddings is not None and head.weight is embeddings.weight
    if tied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
        new = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
        model.set_output_embeddings(new)
        head = new
    with torch.no_grad():
        head.weight.zero_()
        if head.bias is not None:
            head.bias.zero_()
    return model


def build_aligner(config, device):
    """``(model, tokenizer)`` of the initial aligner of a :class:`amendlm.ram.train.TrainConfig`, loaded onto ``device``.

    ``config.aligner`` (any model) or the proposal's first ``config.init_from_proposal_layers``
    blocks; its head zeroed when ``config.zero_head`` (:func:`zero_output_head`); all weights
    trainable, or LoRA-wrapped (``config.lora``: attention and MLP projections, and the head when it
    was zeroed).  ``device``: a torch device (or its string), the Accelerator's (``accelerator.device``),
    not ``config.device``, which may be ``auto`` (Accelerate's choice) or a type without an index.
    """
    from amendlm.modeling import load_model

    device = str(device)
    if config.init_from_proposal_layers is not None:
        model, tokenizer = load_model(config.proposal, device=device)
        truncate_to_layers(model, config.init_from_proposal_layers)
    else:
        model, tokenizer = load_model(config.aligner, device=device)
    if getattr(config, "zero_head", False):
        zero_output_head(model)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name, _ in model.named_modules())]
        if getattr(config, "zero_head", False):
            targets.append(HEAD_NAME)
        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer
