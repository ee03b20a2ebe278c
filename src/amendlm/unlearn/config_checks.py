"""The checks of :class:`~amendlm.unlearn.config.UnlearnConfig` (run by its ``__post_init__``).

Each failed check is one :class:`~amendlm.unlearn.field_errors.ConfigFieldError` about one
condition: it carries the fields the condition involves and writes its message through a naming
(:class:`~amendlm.unlearn.field_errors.FieldNaming`), so that Python callers read field names
(``rest_within=4.0 needs type_focus='all'``) and ``amendlm debias`` the flags the user typed
(``--rest-within 4 needs --type-focus all``), without any message being parsed.  A new check should
name every field through the naming (``n.name(field)``, ``n.value(field, value)``) and list it in
the error's fields.
"""

from __future__ import annotations

import dataclasses
import math

from amendlm.distributed import device_type_only
from amendlm.modeling import AUTO_DTYPE, DTYPES
from amendlm.unlearn.field_errors import DEFAULT, GIVEN, RECIPE, ConfigFieldError
from amendlm.unlearn.losses import CE_REDUCTIONS, NPO_REDUCTIONS
from amendlm.unlearn.methods import METHODS
from amendlm.unlearn.recipes import RECIPE_ALIASES, RECIPES, canonical_recipe, recipe_fields, recipe_names

FINETUNE_MODES = ("lora", "full")
REFERENCE_MODES = ("adapter", "copy")
LORA_SCOPES = ("all", "attention")
SELECTIONS = ("gap", "gap_within_lms")
LOSS_TOKENS = ("all", "differing")
VAL_TASKS = ("intrasentence", "intersentence")
TYPE_FOCUS = ("worst", "all")


def source(config, name: str) -> str:
    """Where ``config``'s value of field ``name`` came from: :data:`~amendlm.unlearn.field_errors.GIVEN`
    (one of the ``recipe_overrides``, or a value that neither the recipe nor the field default gives),
    :data:`~amendlm.unlearn.field_errors.RECIPE` (the value the recipe sets) or
    :data:`~amendlm.unlearn.field_errors.DEFAULT` (the field default, which the recipe leaves alone)."""
    value = getattr(config, name)
    if name in config.recipe_overrides:
        return GIVEN
    preset = recipe_fields(config.recipe)
    if name in preset:
        return RECIPE if value == preset[name] else GIVEN
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return DEFAULT if value == default else GIVEN


def check_config(config) -> None:
    """Validate every field of an :class:`~amendlm.unlearn.config.UnlearnConfig`; normalise ``recipe``
    (a former name becomes the current one: ``default`` -> ``biasunlearn``).

    Raises:
        ConfigFieldError: the first failed condition, one line naming the field(s), the value and
            what is valid (see the module docstring for how fields are named).
    """
    choices = {"method": tuple(METHODS), "dtype": (AUTO_DTYPE, *DTYPES), "npo_reduction": NPO_REDUCTIONS,
               "finetune": FINETUNE_MODES, "reference": REFERENCE_MODES, "lora_scope": LORA_SCOPES,
               "selection": SELECTIONS, "type_focus": TYPE_FOCUS, "loss_tokens": LOSS_TOKENS,
               "ce_reduction": CE_REDUCTIONS}
    if config.val_task is not None:
        choices["val_task"] = VAL_TASKS
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise ConfigFieldError([name], lambda n, name=name, valid=valid:
                                   f"unknown {n.name(name)} '{getattr(config, name)}'; valid: {', '.join(valid)}")
    if config.recipe not in RECIPES and config.recipe not in RECIPE_ALIASES:
        raise ConfigFieldError(["recipe"], lambda n: f"unknown {n.name('recipe')} '{config.recipe}'; valid: {recipe_names()}")
    config.recipe = canonical_recipe(config.recipe)  # "default" is recorded as "biasunlearn"
    _check_numbers(config)
    method = METHODS[config.method]
    if config.finetune == "full" and config.reference == "adapter" and method.reference_streams:
        raise ConfigFieldError(["finetune", "reference"], lambda n: (
            f"{n.value('finetune', 'full')} has no adapter to disable: use {n.value('reference', 'copy')} "
            "(a frozen second copy)"))
    _check_device(config)
    if not config.kl_unrelated and "kl" in method.streams:
        _check_kl_set(config)
    _check_rest_within(config)
    config.schedule()  # validates phases


def _check_kl_set(config) -> None:
    """Without StereoSet's unrelated sentences (``kl_unrelated=False``) the KL set needs general text."""

    def empty(name: str, fix: str) -> ConfigFieldError:
        value = getattr(config, name)
        return ConfigFieldError(["kl_unrelated", name], lambda n: (
            f"{n.value('kl_unrelated', False)} with {n.value(name, value)} leaves the KL set empty: "
            f"{fix} {n.name(name)}, or {n.value('kl_unrelated', True)}"))

    if config.kl_texts is None:
        raise empty("kl_texts", "name a text dataset in")
    if config.kl_text_limit == 0:
        raise empty("kl_text_limit", "raise")


def _check_device(config) -> None:
    """``device``: a device type without a card index, agreeing with ``cpu``."""
    device = config.device
    if ":" in device:
        raise ConfigFieldError(["device"], lambda n: device_type_only(n.value("device", device), device))
    if not device.strip():
        raise ConfigFieldError(["device"], lambda n: (
            f"{n.value('device', device)}: give auto, an accelerator type (cuda, ...) or the CPU"))
    if config.cpu and device not in ("auto", "cpu"):
        raise ConfigFieldError(["cpu", "device"], lambda n: (
            f"{n.value('cpu', True)} and {n.value('device', device)} disagree: give one of them"))


def _check_numbers(config) -> None:
    """The ranges of the numeric fields, one field per message."""

    def refuse(name: str, condition: str, note: str = "") -> ConfigFieldError:
        value = getattr(config, name)
        return ConfigFieldError([name], lambda n: f"{n.name(name)} must be {condition}, got {value}{note}")

    for name in ("max_steps", "batch_size", "max_length", "checkpoint_every", "lora_r", "kl_chunk_tokens"):
        if getattr(config, name) < 1:
            raise refuse(name, ">= 1")
    for name in ("lr", "npo_beta", "dpo_beta", "tolerance"):
        if not getattr(config, name) > 0:
            raise refuse(name, "> 0")
    if not (math.isfinite(config.schedule_scale) and config.schedule_scale > 0):
        raise refuse("schedule_scale", "a finite number > 0", " (it multiplies the swap schedule's step counts)")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise ConfigFieldError(["max_grad_norm"], lambda n: (
            f"{n.name('max_grad_norm')} must be > 0, got {config.max_grad_norm} "
            f"({n.value('max_grad_norm', None)}: no clipping)"))
    for name in ("alpha_forget", "alpha_retain", "alpha_kl", "weight_decay", "warmup_steps", "eval_every",
                 "phase_warmup_steps", "early_until_step", "initial_all_types_steps", "initial_eval_every",
                 "max_lms_drop"):
        if getattr(config, name) < 0:
            raise refuse(name, ">= 0")
    if config.val_clusters is not None and config.val_clusters < 1:
        raise ConfigFieldError(["val_clusters"], lambda n: (
            f"{n.name('val_clusters')} must be >= 1, got {config.val_clusters} ({n.value('val_clusters', None)}: all)"))
    for name in ("forget_batch_size", "retain_batch_size", "kl_batch_size", "val_clusters_per_type",
                 "early_scheduler_steps", "initial_scheduler_steps"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise refuse(name, ">= 1 or None")
    if config.kl_text_limit is not None and config.kl_text_limit < 0:
        raise refuse("kl_text_limit", ">= 0 or None")
    if not 0.0 <= config.adversarial_fraction <= 1.0:
        raise refuse("adversarial_fraction", "in [0, 1]")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise refuse("lora_dropout", "in [0, 1)")


def _check_rest_within(config) -> None:
    """``rest_within``: None, or a finite gap at least ``tolerance`` under ``type_focus='all'``, given only
    to a method with dynamic swapping (a recipe's value on another method is inert; one message per
    condition)."""
    value = config.rest_within
    if value is None:
        return
    if not math.isfinite(value):
        raise ConfigFieldError(["rest_within"], lambda n: f"{n.value('rest_within', value)} must be finite (a val SS gap)")
    if not METHODS[config.method].dynamic_swap:
        if source(config, "rest_within") != GIVEN:  # a recipe's value that the method never reads
            return
        swapping = ", ".join(name for name, method in METHODS.items() if method.dynamic_swap)
        raise ConfigFieldError(["rest_within", "method"], lambda n: (
            f"{n.value('rest_within', value)} acts only on a method with BiasUnlearn's swap control "
            f"({swapping}); {n.value('method', config.method)} has none"))
    if value < config.tolerance:
        raise ConfigFieldError(["rest_within", "tolerance"], lambda n: (
            f"{n.value('rest_within', value)} must be >= {n.name('tolerance')} ({config.tolerance:g}, the stop "
            "rule's gap: a type within it does not train anyway)"))
    if config.type_focus != "all":
        raise ConfigFieldError(["rest_within", "type_focus"], lambda n: (
            f"{n.value('rest_within', value)} needs {n.value('type_focus', 'all')} "
            f"({n.value('type_focus', config.type_focus)}, {n.origin('type_focus', source(config, 'type_focus'), config.recipe)})"))
