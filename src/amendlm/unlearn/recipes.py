"""Named presets of :class:`~amendlm.unlearn.config.UnlearnConfig` fields (``amendlm debias --recipe``).

A recipe is plain data: the field values it sets.  :meth:`UnlearnConfig.from_recipe` fills a
config from one and lets explicitly given options override it; ``unlearn_config.json`` records
the recipe's name (``recipe``) and the overriding options (``recipe_overrides``).

* ``biasunlearn`` sets nothing: :class:`UnlearnConfig`'s field defaults (BiasUnlearn's NPO / CE / KL
  losses and val-driven swapping with amendlm's own settings; the recipe of the Python API and of
  ``--method M``).  ``default``, its name until the ``debias`` command's default became
  :data:`CLI_DEFAULT_RECIPE` (``pairwise``, see :func:`cli_recipe`), is kept as an alias
  (:data:`RECIPE_ALIASES`): an ``unlearn_config.json`` or command that says ``default`` means the
  same run, and :func:`canonical_recipe` maps it to ``biasunlearn`` wherever names are compared.
* ``official`` follows the public BiasUnlearn code (github a101269/BiasUnlearn: train.py,
  loss.py, run.sh; DESIGN.md §4, end):

  - ``torch.optim.AdamW`` at lr 4e-5 (GPT-2-large; the code uses 2e-5 for 7B models) with its
    default weight decay 0.01 and no gradient clipping, linear schedules;
    10 warm-up steps for the first phase (``get_scheduler(num_warmup_steps=10)``) and 5 for
    every later phase (``num_warmup_steps=5`` in train.py's phase loop);
  - per-device batches forget 4 / retain 28 / KL 28 (run.sh); in a swapped phase the anti-stereotype
    loader (batch 28) is the forget stream and the stereotype loader (batch 4) the retain stream
    (train.py passes them in exchanged order): ``swap_batch_sizes``;
  - the adversarial share (``--mix_anti``): in a focus phase a quarter of the type's
    anti-stereotypes joins its stereotype set (dataloader.py ``ster_<type> += anti_<type>[:n//4]``),
    as amendlm's per-type forget sets;
  - LoRA r 8, alpha 16, dropout 0.1 on the attention projections only (GPT-2 ``attn.c_attn`` and
    ``attn.c_proj``; Llama-like ``q/k/v/o_proj``);
  - NPO on one log-ratio per batch, the mean over sequences of each sequence's token-mean
    NLL difference (loss.py ``lm_loss``: ``CrossEntropyLoss(reduction="mean")`` per sequence,
    then ``torch.stack(losses).mean()``): ``batch_sequence_mean``; the retain CE is the same
    mean of per-sequence token means (``ce_reduction="sequence"``);
  - the KL set is StereoSet's unrelated sentences only (no general text);
  - all bias types together until step 100, first (decision) evaluation at step 100; the first
    horizon is 1.2 x the step cap (``num_training_steps * 1.2``, one device);
  - then after every evaluation a *fresh* AdamW and schedule: gap > 5 -> lr, 3000 scheduler
    steps before step 400 (1000 after), evaluate after 80 steps; gap 3-5 -> 0.8 lr, 200, 50;
    gap <= 3 -> 0.8 lr, 200, 30 (``schedule_scale`` 1: unscaled);
  - stop when every bias type is within 2 of the target; at most 1000 steps;
  - in-loop evaluation on 100 intrasentence val clusters per bias type.

  The numbers are those of the official code run on **one** device.  The paper's run used 4
  GPUs (run.sh), where the global batch is 16 / 112 / 112 and, because ``accelerate`` steps a
  prepared scheduler once per process at every optimizer step, every scheduler horizon and
  warm-up is 4x shorter in optimizer steps (3000 -> 750, 1000 -> 250, 200 -> 50; the
  evaluation periods are not); override ``phases`` / ``early_scheduler_steps`` to follow that run.
  amendlm's batch sizes are global whatever the number of processes (:mod:`amendlm.distributed`),
  so that run's batches are ``--forget-batch-size 16 --retain-batch-size 112 --kl-batch-size 112``.

  Not reproduced: the official targets are SS 49/49/49/48 (gender/profession/race/religion),
  amendlm's stop rule uses 50; the official "KL" also counts padding positions (amendlm masks
  them); the official phases evaluate at multiples of their period, amendlm after it.  The
  adversarial share differs in two phases: in the all-types phase the official code adds the
  first quarter of the anti-stereotypes concatenated gender, profession, race, religion (all of
  gender's, about a third of profession's, none of race's or religion's), amendlm a quarter of
  each type's; in a swapped phase the official forget stream is the type's anti-stereotypes only
  and its retain stream the stereotypes *with* the mixed-in quarter of anti-stereotypes, while
  amendlm exchanges the roles (forget: anti-stereotypes + a quarter of the stereotypes; retain:
  the stereotypes).

* ``pairwise`` keeps BiasUnlearn's control and replaces its forget / retain losses by a pairwise
  one (``--method dpo-swap``): DPO on (anti-stereotype, stereotype) pairs of the same context,
  + 0.1 CE on the anti-stereotype + 0.2 KL on neutral text; every bias type whose val SS is
  outside 50 ± 2 is trained at once, each towards 50 (``type_focus="all"``: its pairs reversed
  when its val SS is below 50), except that a type within 4 of 50 rests for the phase while a
  farther one trains (``rest_within=4``); decisions every 20 steps on all val clusters; lr 5e-4
  with 5 warm-up steps, 100 steps; the kept evaluation is the smallest worst val gap among those
  whose val LMS fell at most 2 points.  Chosen on val only: it is the ``dpo-swap-rest`` row of
  ``experiments/unlearn_ablation.py`` (a test checks that the two agree), whose page reports what
  it reaches on the test targets.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

OFFICIAL: Mapping[str, object] = MappingProxyType({
    "lr": 4e-5,
    "weight_decay": 0.01,
    "max_grad_norm": None,
    "kl_texts": None,
    "warmup_steps": 10,
    "phase_warmup_steps": 5,
    "batch_size": 4,
    "forget_batch_size": 4,
    "retain_batch_size": 28,
    "kl_batch_size": 28,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "lora_scope": "attention",
    "target_modules": None,
    "npo_reduction": "batch_sequence_mean",
    "ce_reduction": "sequence",
    "npo_beta": 0.1,
    "alpha_forget": 0.5,
    "alpha_retain": 0.3,
    "alpha_kl": 0.2,
    "adversarial_fraction": 0.25,
    "swap_batch_sizes": True,
    "max_steps": 1000,
    "initial_all_types_steps": 100,
    "initial_scheduler_steps": 1200,
    "fresh_optimizer_per_phase": True,
    "phases": [[5.0, 1.0, 1000, 80], [3.0, 0.8, 200, 50], [0.0, 0.8, 200, 30]],
    "early_scheduler_steps": 3000,
    "early_until_step": 400,
    "schedule_scale": 1.0,
    "tolerance": 2.0,
    "val_task": "intrasentence",
    "val_clusters": None,
    "val_clusters_per_type": 100,
})

PAIRWISE: Mapping[str, object] = MappingProxyType({
    "method": "dpo-swap",
    "type_focus": "all",
    "alpha_forget": 1.0,
    "alpha_retain": 0.1,
    "alpha_kl": 0.2,
    "lr": 5e-4,
    "warmup_steps": 5,
    "schedule_scale": 1.0,
    "phases": [[5.0, 1.0, 100, 20], [3.0, 0.8, 50, 20], [0.0, 0.8, 50, 20]],
    "val_clusters": None,
    "max_steps": 100,
    "selection": "gap_within_lms",
    "max_lms_drop": 2.0,
    "rest_within": 4.0,
})

RECIPES: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "biasunlearn": MappingProxyType({}),
    "official": OFFICIAL,
    "pairwise": PAIRWISE,
})

# former names still accepted (and found in saved configs), with the recipe each names now
RECIPE_ALIASES: Mapping[str, str] = MappingProxyType({"default": "biasunlearn"})


CLI_DEFAULT_RECIPE = "pairwise"


def canonical_recipe(name: str) -> str:
    """The current name of recipe ``name`` (an alias in :data:`RECIPE_ALIASES` -> its recipe).

    Raises:
        ValueError: unknown name (lists the valid ones and the aliases).
    """
    name = RECIPE_ALIASES.get(name, name)
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}'; valid: {recipe_names()}")
    return name


def recipe_names() -> str:
    """The recipes' names and the former names, for a message: ``biasunlearn, official, pairwise
    (former names: default = biasunlearn)``."""
    aliases = ", ".join(f"{alias} = {target}" for alias, target in RECIPE_ALIASES.items())
    return f"{', '.join(RECIPES)} (former names: {aliases})"


def cli_recipe(recipe: str | None, method: str | None) -> str:
    """The recipe of a ``debias`` call: ``recipe`` when given (its current name); else ``pairwise``
    (:data:`CLI_DEFAULT_RECIPE`, the recipe the ablation recommends on val) unless ``method`` names
    another method, whose run then takes the field defaults (``biasunlearn``) — so ``--method npo``
    is NPO as documented, not NPO with the pairwise recipe's weights and learning rate.

    Args:
        recipe: ``--recipe`` as given, or None.
        method: ``--method`` as given, or None.

    Raises:
        ValueError: unknown recipe (:func:`canonical_recipe`).
    """
    if recipe is not None:
        return canonical_recipe(recipe)
    return CLI_DEFAULT_RECIPE if method in (None, PAIRWISE["method"]) else "biasunlearn"


def recipe_fields(name: str) -> dict[str, object]:
    """The field values preset ``name`` (or an alias of it) sets (a fresh dict; lists copied).

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    preset = RECIPES[canonical_recipe(name)]
    return {key: [list(row) for row in value] if key == "phases" else value for key, value in preset.items()}
