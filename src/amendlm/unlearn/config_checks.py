"""The checks of :class:`~amendlm.unlearn.config.UnlearnConfig` (run by its ``__post_init__``).

Each failed check is one ``ValueError`` about one condition, and its message names fields in one
of two forms only: the bare field name (``max_steps must be >= 1, got 0``) or ``field=value`` with
the value as Python writes it (``rest_within=4.0 needs type_focus='all'``).  ``amendlm debias``
relies on these forms to name its flags instead (:func:`amendlm.unlearn.flags.error_line`:
``--rest-within 4 needs --type-focus all``); a new message should use them too, and not use a
field's name as a plain word (``model``, ``device``, ``method``, ``seed``, ...), which would be read
as the field.
"""

from __future__ import annotations

import math

from amendlm.distributed import device_type_only
from amendlm.modeling import parse_dtype
from amendlm.unlearn.losses import CE_REDUCTIONS, NPO_REDUCTIONS
from amendlm.unlearn.methods import get_method
from amendlm.unlearn.recipes import canonical_recipe

FINETUNE_MODES = ("lora", "full")
REFERENCE_MODES = ("adapter", "copy")
LORA_SCOPES = ("all", "attention")
SELECTIONS = ("gap", "gap_within_lms")
LOSS_TOKENS = ("all", "differing")
VAL_TASKS = ("intrasentence", "intersentence")
TYPE_FOCUS = ("worst", "all")


def origin(config, name: str) -> str:
    """Where ``config``'s value of field ``name`` came from, for an error message: ``given`` (one of
    the options that overrode the recipe) or ``from recipe NAME`` (the recipe's value, or the field
    default a recipe leaves alone)."""
    return "given" if name in config.recipe_overrides else f"from recipe {config.recipe}"


def check_config(config) -> None:
    """Validate every field of an :class:`~amendlm.unlearn.config.UnlearnConfig`; normalise ``recipe``
    (a former name becomes the current one: ``default`` -> ``biasunlearn``).

    Raises:
        ValueError: the first failed condition, one line naming the field(s), the value and what is
            valid (see the module docstring for how fields are named).
    """
    method = get_method(config.method)
    parse_dtype(config.dtype)
    _check_numbers(config)
    choices = {"npo_reduction": NPO_REDUCTIONS, "finetune": FINETUNE_MODES, "reference": REFERENCE_MODES,
               "lora_scope": LORA_SCOPES, "selection": SELECTIONS, "type_focus": TYPE_FOCUS,
               "loss_tokens": LOSS_TOKENS, "ce_reduction": CE_REDUCTIONS}
    if config.val_task is not None:
        choices["val_task"] = VAL_TASKS
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise ValueError(f"unknown {name} '{getattr(config, name)}'; valid: {', '.join(valid)}")
    if config.finetune == "full" and config.reference == "adapter" and method.reference_streams:
        raise ValueError("finetune='full' has no adapter to disable: use reference='copy' (a frozen second copy)")
    config.recipe = canonical_recipe(config.recipe)  # "default" is recorded as "biasunlearn"; raises for an unknown one
    if ":" in config.device:
        raise ValueError(device_type_only(f"device={config.device!r}", config.device))
    if not config.device.strip():
        raise ValueError(f"device={config.device!r}: give auto, an accelerator type (cuda, ...) or the CPU")
    if config.cpu and config.device not in ("auto", "cpu"):
        raise ValueError(f"cpu=True and device={config.device!r} disagree: give one of them")
    kl_set = "kl" in method.streams
    if not config.kl_unrelated and config.kl_texts is None and kl_set:
        raise ValueError("kl_unrelated=False with kl_texts=None leaves the KL set empty: give kl_texts")
    if not config.kl_unrelated and config.kl_text_limit == 0 and kl_set:
        raise ValueError("kl_unrelated=False with kl_text_limit=0 leaves the KL set empty")
    _check_rest_within(config)
    config.schedule()  # validates phases and schedule_scale


def _check_numbers(config) -> None:
    """The ranges of the numeric fields, one field per message."""
    for name in ("max_steps", "batch_size", "max_length", "checkpoint_every", "lora_r", "kl_chunk_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("lr", "npo_beta", "dpo_beta", "tolerance"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {config.max_grad_norm} (max_grad_norm=None: no clipping)")
    for name in ("alpha_forget", "alpha_retain", "alpha_kl", "weight_decay", "warmup_steps", "eval_every",
                 "phase_warmup_steps", "early_until_step", "initial_all_types_steps", "initial_eval_every",
                 "max_lms_drop"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.val_clusters is not None and config.val_clusters < 1:
        raise ValueError(f"val_clusters must be >= 1, got {config.val_clusters} (val_clusters=None: all)")
    for name in ("forget_batch_size", "retain_batch_size", "kl_batch_size", "val_clusters_per_type",
                 "early_scheduler_steps", "initial_scheduler_steps"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {getattr(config, name)}")
    if config.kl_text_limit is not None and config.kl_text_limit < 0:
        raise ValueError(f"kl_text_limit must be >= 0 or None, got {config.kl_text_limit}")
    if not 0.0 <= config.adversarial_fraction <= 1.0:
        raise ValueError(f"adversarial_fraction must be in [0, 1], got {config.adversarial_fraction}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")


def _check_rest_within(config) -> None:
    """``rest_within``: None, or a finite gap at least ``tolerance`` under ``type_focus='all'`` (one
    message per condition)."""
    value = config.rest_within
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"rest_within={value!r} must be finite (a val SS gap)")
    if value < config.tolerance:
        raise ValueError(f"rest_within={value!r} must be >= tolerance ({config.tolerance:g}, the stop rule's gap: "
                         "a type within it does not train anyway)")
    if config.type_focus != "all":
        raise ValueError(f"rest_within={value!r} needs type_focus='all' (type_focus={config.type_focus!r}, "
                         f"{origin(config, 'type_focus')})")
