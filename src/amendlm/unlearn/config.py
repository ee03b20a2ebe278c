"""``UnlearnConfig``: every option of ``amendlm debias``, validated once, saved beside the outputs."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from amendlm.data.splits import DEFAULT_SEED
from amendlm.resources import DEFAULT_MODEL
from amendlm.unlearn.config_checks import check_config
from amendlm.unlearn.methods import LossWeights
from amendlm.unlearn.recipes import RECIPE_ALIASES, recipe_fields
from amendlm.unlearn.field_errors import ConfigFieldError
from amendlm.unlearn.schedule import DEFAULT_TOLERANCE, OFFICIAL_PHASES, Phase, scaled_phases


# Fields added to UnlearnConfig after runs were first recorded, with the value each had when it was
# added (the value that reproduces the behaviour from before it existed).  A saved
# unlearn_config.json without one of them was made with that value, whatever the default becomes
# later (used by the resume check and by the experiment scripts' reuse check).
FIELDS_ADDED: dict[str, object] = {
    "forget_batch_size": None, "retain_batch_size": None, "kl_batch_size": None, "phase_warmup_steps": 0,
    "ce_reduction": "token", "lora_scope": "all", "early_scheduler_steps": None, "early_until_step": 0,
    "initial_all_types_steps": 0, "initial_scheduler_steps": None, "fresh_optimizer_per_phase": False,
    "val_clusters_per_type": None, "val_task": None, "selection": "gap", "max_lms_drop": 2.0,
    "loss_tokens": "all", "recipe": "biasunlearn", "recipe_overrides": {}, "swap_batch_sizes": False,
    "kl_unrelated": True, "initial_eval_every": 0, "type_focus": "worst", "device": "auto", "packing": False,
    "rest_within": None,
}


def with_added_fields(saved: dict) -> dict:
    """A saved ``unlearn_config.json`` completed with :data:`FIELDS_ADDED` for the fields it predates,
    its recipe under its current name (``default`` -> ``biasunlearn``: :func:`~amendlm.unlearn.recipes.canonical_recipe`)."""
    completed = {**{k: v for k, v in FIELDS_ADDED.items() if k not in saved}, **saved}
    if isinstance(completed.get("recipe"), str) and completed["recipe"] in RECIPE_ALIASES:
        completed["recipe"] = RECIPE_ALIASES[completed["recipe"]]
    return completed


@dataclass
class UnlearnConfig:
    """Options of one unlearning run (BiasUnlearn or a baseline; DESIGN.md §4).

    Attributes:
        out: output directory (adapter, ``unlearn_config.json``, ``log.jsonl``, plot, checkpoint).
        model: embedded name, local directory or hub id of the base model.
        method: a name in :data:`amendlm.unlearn.methods.METHODS`.
        max_steps: optimizer steps at most (BiasUnlearn may stop earlier by its stop rule).
            A step of batch 8 is about 0.8 TFLOP for the embedded model (6 x params per policy
            token, 2 x params per reference token), ~8 s at 108 GFLOP/s fp32, so 200 steps plus
            evaluations aim at ~30 minutes on 2 idle cores (estimated, not measured on an idle machine).
        batch_size: examples per stream per step (forget, retain and KL batches each): the global
            batch, split between the processes of ``accelerate launch`` (:mod:`amendlm.distributed`).
        forget_batch_size / retain_batch_size / kl_batch_size: per-stream batch sizes (``None``:
            ``batch_size``); DPO's chosen / rejected pairs use the forget size.  Official 4 / 28 / 28.
        swap_batch_sizes: in a swapped phase (the anti-stereotypes forgotten) the forget and retain
            streams exchange batch sizes, as the official code does (its anti loader, batch 28, becomes
            the forget stream and its stereotype loader, batch 4, the retain stream).
        lr: peak AdamW learning rate.  The paper uses 4e-5 for GPT-2 over thousands of steps;
            our default budget is a few hundred steps, so LoRA needs a larger rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up at the start of the run.
        phase_warmup_steps: linear warm-up again at the start of every later phase (one restarted
            by an evaluation; 0: none).  Official code: 5.
        max_grad_norm: gradient clipping norm; ``None``: no clipping (the official code), the norm
            is still measured (a non-finite norm stops the run like a NaN loss).
        alpha_forget / alpha_retain / alpha_kl: loss weights 0.5 / 0.3 / 0.2 (paper).
        npo_beta: NPO inverse temperature 0.1 (paper); npo_reduction: ``sequence`` (per-sequence
            summed log-ratio, open-unlearning), ``token_mean`` (per-sequence token-mean log-ratio),
            ``batch_mean`` (one token-weighted log-ratio per batch) or ``batch_sequence_mean`` (one
            log-ratio per batch, the mean of the sequences' token means: the official ``lm_loss``);
            see :func:`amendlm.unlearn.losses.npo_loss`.
        ce_reduction: the CE (retain; ascent) mean: ``token`` (over the batch's tokens) or
            ``sequence`` (of each sequence's token mean: the official ``lm_loss``); :func:`~amendlm.unlearn.losses.ce_loss`.
        loss_tokens: ``all`` continuation tokens, or only those ``differing`` from the other side of
            the same StereoSet cluster (position-aligned from the continuation's start; the shared
            " She is a" and "." then pull neither way).  Applies to every stream but KL.
        dpo_beta: DPO inverse temperature for the ``dpo`` baseline.
        adversarial_fraction: share of anti-stereotypes also forgotten, per bias type (0.25).
        kl_unrelated: StereoSet's unrelated sentences in the KL set (True, DESIGN.md §4); False
            keeps only the general text there (``kl_texts`` is then required for KL methods).
        kl_texts: general text added to the KL set (``None``: unrelated sentences only).
            Default ``xsum-sample`` documents, *not* the WikiText sample, because perplexity is
            reported on WikiText and the KL term would otherwise train on the measured text.
        kl_text_field: the field of ``kl_texts`` rows holding the text.
        kl_text_limit: use the first N texts (``None``: all); 50 XSum documents give about 10% of
            the KL examples, the rest being the unrelated sentences.
        kl_chunk_tokens: length of the general-text chunks in tokens.
        max_length: examples longer than this many tokens are cut (continuation kept).
        finetune: ``lora`` (PEFT adapter; reference = adapter disabled) or ``full``.
        lora_r / lora_alpha / lora_dropout: 8 / 16 / 0.1 (paper).
        target_modules: LoRA targets (module-name suffixes); ``None`` detects them by ``lora_scope``.
        lora_scope: ``all`` (attention + MLP projections) or ``attention`` (official: GPT-2
            ``attn.c_attn`` / ``attn.c_proj``, Llama ``q/k/v/o_proj``); see :mod:`amendlm.unlearn.models`.
        reference: ``adapter`` (the base under a disabled adapter, one copy in memory) or ``copy``
            (a frozen second model; forced by full fine-tuning).
        tolerance: stop when every val bias type's |SS - 50| is below it (2 points).
        phases: swap schedule rows ``(min_gap, lr_scale, scheduler_steps, eval_every)``.
        schedule_scale: multiplies the schedule's step counts (0.25 fits a few-hundred-step budget).
        early_scheduler_steps / early_until_step: the first phase row's horizon before step
            ``early_until_step`` (official: 3000 before step 400, the row's own 1000 after; ``None``: no change).
        initial_all_types_steps: train on every bias type until this step before the first
            swap decision (the step-0 evaluation is still recorded); official 100, default 0.
        type_focus: what a decision trains on.  ``worst`` (BiasUnlearn): the bias type with the
            largest val gap alone, swapped when its SS is below 50.  ``all``: every bias type whose val
            gap is at least ``tolerance``, together, each one swapped whose val SS is below 50
            (types within the tolerance are left out until they drift out; the worst gap still
            picks the phase).
        rest_within: ``type_focus="all"`` only: a type whose val gap is below this rests for the phase
            (it is near 50 and a full-rate phase would push it past), unless every type outside the
            tolerance is below it (then those are trained).  ``None``: only the tolerance leaves types out.
        initial_eval_every: evaluate every this many steps during those initial steps (recorded and
            used for ``keep_best``, no swap decision); 0 (official): first evaluation after them.
        initial_scheduler_steps: horizon of the linear decay before the first decision (``None``: ``max_steps``).
        fresh_optimizer_per_phase: every decision evaluation resets AdamW's moments (a fresh
            optimizer, as the official code builds one per phase).
        eval_every: evaluation period of methods without dynamic swapping (0: only at start and end).
        val_clusters: val clusters scored per evaluation, stratified by bias type (``None``: all 863).
        val_clusters_per_type: instead, this many val clusters of each bias type (official 100;
            fewer where a type has fewer).  val_task: only ``intrasentence`` or ``intersentence`` val clusters.
        checkpoint_every: steps between checkpoints.
        keep_best: save the adapter of the evaluation chosen by ``selection`` as the result
            (else the last step's).
        selection: ``gap`` (smallest worst val SS gap) or ``gap_within_lms`` (the same among the
            evaluations whose overall val LMS fell at most ``max_lms_drop`` points from step 0).
        recipe / recipe_overrides: the preset the config was built from and the options that
            overrode it (records written by :meth:`from_recipe`; ``recipe`` is checked to exist, and
            a former name is recorded as the current one: ``default`` -> ``biasunlearn``).
        seed / split_seed: training seed and target-term split seed.
        dtype: ``fp32``, ``bf16`` autocast (fast only on hardware with bf16 units) or ``auto`` (bf16
            where the device does it natively fast, else fp32).  The trainer resolves ``auto`` and
            ``unlearn_config.json`` records the resolved dtype, with ``dtype_auto: true``.
        cpu: force the CPU even when an accelerator is present (the same as ``device="cpu"``).
        device: ``auto`` (an accelerator when Accelerate finds one, else the CPU), ``cpu`` or an
            accelerator type (``cuda``, ``mps``, ...; no index: Accelerate assigns the card).  Where
            the run trains, not what: a resumed run may change it.
        packing: the fast training step (:mod:`amendlm.unlearn.forward`): each step's examples
            in packed rows with block attention masks, and NPO's / DPO's reference log-probs
            computed once per example; the same losses up to float rounding.  Off (default)
            reproduces the padded passes of every run recorded before it existed.
        stereoset: StereoSet name or file.
    """

    out: str
    model: str = DEFAULT_MODEL
    method: str = "biasunlearn"
    max_steps: int = 200
    batch_size: int = 8
    forget_batch_size: int | None = None
    retain_batch_size: int | None = None
    kl_batch_size: int | None = None
    swap_batch_sizes: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    phase_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    alpha_forget: float = 0.5
    alpha_retain: float = 0.3
    alpha_kl: float = 0.2
    npo_beta: float = 0.1
    npo_reduction: str = "sequence"
    ce_reduction: str = "token"
    dpo_beta: float = 0.1
    adversarial_fraction: float = 0.25
    kl_unrelated: bool = True
    kl_texts: str | None = "xsum-sample"
    kl_text_field: str = "document"
    kl_text_limit: int | None = 50
    kl_chunk_tokens: int = 64
    max_length: int = 128
    finetune: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    lora_scope: str = "all"
    reference: str = "adapter"
    tolerance: float = DEFAULT_TOLERANCE
    phases: list[list[float]] = field(default_factory=lambda: [[p.min_gap, p.lr_scale, p.scheduler_steps, p.eval_every] for p in OFFICIAL_PHASES])
    schedule_scale: float = 0.25
    early_scheduler_steps: int | None = None
    early_until_step: int = 0
    initial_all_types_steps: int = 0
    initial_eval_every: int = 0
    type_focus: str = "worst"
    rest_within: float | None = None
    initial_scheduler_steps: int | None = None
    fresh_optimizer_per_phase: bool = False
    eval_every: int = 50
    val_clusters: int | None = 300
    val_clusters_per_type: int | None = None
    val_task: str | None = None
    checkpoint_every: int = 25
    keep_best: bool = True
    selection: str = "gap"
    max_lms_drop: float = 2.0
    loss_tokens: str = "all"
    seed: int = 0
    split_seed: int = DEFAULT_SEED
    dtype: str = "fp32"
    cpu: bool = False
    device: str = "auto"
    packing: bool = False
    stereoset: str = "stereoset"
    recipe: str = "biasunlearn"
    recipe_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_config(self)  # one ValueError per failed condition (amendlm.unlearn.config_checks)

    def schedule(self, step: int | None = None) -> tuple[Phase, ...]:
        """The swap schedule as :class:`Phase` rows, step counts scaled by ``schedule_scale``.

        At a ``step`` before ``early_until_step`` the first row's horizon is
        ``early_scheduler_steps`` (official: 3000 before step 400, then the row's 1000).

        Raises:
            ConfigFieldError: malformed ``phases`` (``schedule_scale`` is checked with the other fields).
        """
        try:
            phases = [Phase(float(a), float(b), int(c), int(d)) for a, b, c, d in self.phases]
        except (TypeError, ValueError):
            raise ConfigFieldError(["phases"], lambda n: (
                f"{n.name('phases')} must be rows of [min_gap, lr_scale, scheduler_steps, eval_every], got {self.phases}")) from None
        if not phases or any(p.lr_scale <= 0 or p.scheduler_steps < 1 or p.eval_every < 1 for p in phases):
            raise ConfigFieldError(["phases"], lambda n: (
                f"{n.name('phases')} {self.phases}: give at least one row, each with lr_scale > 0, scheduler_steps >= 1 "
                "and eval_every >= 1"))
        if step is not None and self.early_scheduler_steps is not None and step < self.early_until_step:
            phases[0] = replace(phases[0], scheduler_steps=self.early_scheduler_steps)
        return scaled_phases(phases, self.schedule_scale)

    def stream_batch_size(self, stream: str, swapped: bool = False) -> int:
        """Examples per step of ``stream`` (``forget``, ``retain``, ``kl``, ``chosen``, ``rejected``);
        ``swapped``: the phase forgets the anti-stereotypes (see ``swap_batch_sizes``; DPO's
        chosen / rejected pairs keep the forget size either way).

        Raises:
            ValueError: unknown stream.
        """
        sizes = {"forget": self.forget_batch_size, "chosen": self.forget_batch_size, "rejected": self.forget_batch_size,
                 "retain": self.retain_batch_size, "kl": self.kl_batch_size}
        if stream not in sizes:
            raise ValueError(f"unknown stream '{stream}'; valid: {', '.join(sizes)}")
        if swapped and self.swap_batch_sizes and stream in ("forget", "retain"):
            stream = "retain" if stream == "forget" else "forget"
        return sizes[stream] or self.batch_size

    @classmethod
    def from_recipe(cls, recipe: str, out: str, overrides: dict | None = None, **defaults) -> "UnlearnConfig":
        """A config from preset ``recipe`` (:mod:`amendlm.unlearn.recipes`), ``overrides`` winning.

        Precedence: ``overrides`` > the recipe > ``defaults`` (e.g. the CLI's own defaults) >
        the field defaults.  ``recipe`` and ``recipe_overrides`` (= ``overrides``) are recorded.
        An explicit ``batch_size`` drops the recipe's per-stream batch sizes, and an explicit
        ``val_clusters`` its ``val_clusters_per_type``, so that no explicit option is hidden.

        Raises:
            ValueError: unknown recipe or field, or an invalid value.
        """
        overrides = dict(overrides or {})
        preset = dict(recipe_fields(recipe))
        # an explicit general option replaces the recipe's finer ones it would otherwise be hidden by
        if "batch_size" in overrides:
            for key in ("forget_batch_size", "retain_batch_size", "kl_batch_size"):
                preset.pop(key, None)
        if "val_clusters" in overrides:
            preset.pop("val_clusters_per_type", None)
        data = {**defaults, **preset, **overrides, "out": str(out), "recipe": recipe,
                "recipe_overrides": overrides}
        return cls.from_dict(data)

    def loss_weights(self) -> LossWeights:
        """The hyper-parameters the method's loss reads."""
        return LossWeights(forget=self.alpha_forget, retain=self.alpha_retain, kl=self.alpha_kl, npo_beta=self.npo_beta,
                           npo_reduction=self.npo_reduction, dpo_beta=self.dpo_beta, ce_reduction=self.ce_reduction)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UnlearnConfig":
        """Rebuild from :meth:`to_dict` output or a JSON object of fields (absent ones: defaults).

        ``dtype_auto`` (a record in ``unlearn_config.json``: the saved dtype was chosen by ``auto``)
        is dropped; the saved, resolved ``dtype`` is kept.

        Raises:
            ValueError: unknown keys, or a value of the wrong JSON type (e.g. ``"false"`` for a
                boolean, ``"3e-5"`` for a number), naming the field.
        """
        data = {k: v for k, v in data.items() if k != "dtype_auto"}
        check_fields(data)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "UnlearnConfig":
        """Read a config saved as JSON."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_fields(data: dict) -> None:
    """Check that the keys of ``data`` (a JSON object of fields, e.g. a config file's) are
    :class:`UnlearnConfig` fields and that each value has the field's JSON type; the values
    themselves are checked when the config is built.  ``dtype_auto`` (a record of
    ``unlearn_config.json``) is taken as a key.

    Raises:
        ValueError: the unknown keys, each with the field it may be a misspelling of, or the
            first value of the wrong type (e.g. ``"false"`` for a boolean), naming the key.
    """
    names = {f.name for f in fields(UnlearnConfig)}
    unknown = sorted(set(data) - names - {"dtype_auto"})
    if unknown:
        hints = {name: difflib.get_close_matches(name, names, n=1) for name in unknown}
        said = ", ".join(f"'{n}'" + (f" (did you mean '{h[0]}'?)" if h else "") for n, h in hints.items())
        raise ValueError(f"unknown UnlearnConfig fields: {said}")
    for name, value in data.items():
        if name in names:
            _check_json_type(name, value, _FIELD_TYPES[name])


# the JSON types each field accepts (annotations are strings under `from __future__ import annotations`)
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
_FIELD_TYPES: dict[str, tuple[str, ...]] = {
    f.name: tuple(part.strip().split("[")[0] for part in str(f.type).split("|")) for f in fields(UnlearnConfig)
}


def _check_json_type(name: str, value, kinds: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is of one of the annotated ``kinds`` (``None`` only if allowed)."""
    if any(k not in _JSON_TYPES and k != "None" for k in kinds):
        return  # a type JSON cannot name: left to the dataclass and __post_init__
    if value is None:
        if "None" in kinds:
            return
    elif any(isinstance(value, _JSON_TYPES[k]) and not (k in ("int", "float") and isinstance(value, bool))
             for k in kinds if k in _JSON_TYPES):
        return
    raise ValueError(f"field {name}: expected {' or '.join(kinds)}, got {value!r}")
