"""``UnlearnConfig``: every option of ``amendlm debias``, validated once, saved beside the outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from amendlm.data.splits import DEFAULT_SEED
from amendlm.modeling import parse_dtype
from amendlm.resources import DEFAULT_MODEL
from amendlm.unlearn.losses import NPO_REDUCTIONS
from amendlm.unlearn.methods import LossWeights, get_method
from amendlm.unlearn.schedule import OFFICIAL_PHASES, Phase, scaled_phases

FINETUNE_MODES = ("lora", "full")
REFERENCE_MODES = ("adapter", "copy")


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
        batch_size: examples per stream per step (forget, retain and KL batches each).
        lr: peak AdamW learning rate.  The paper uses 4e-5 for GPT-2 over thousands of steps;
            our default budget is a few hundred steps, so LoRA needs a larger rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up at the start of the run.
        max_grad_norm: gradient clipping norm (a non-finite norm stops the run like a NaN loss).
        alpha_forget / alpha_retain / alpha_kl: loss weights 0.5 / 0.3 / 0.2 (paper).
        npo_beta: NPO inverse temperature 0.1 (paper); npo_reduction: ``sequence`` (per-sequence
            summed log-ratio, open-unlearning) or ``batch_mean`` (the official code).
        dpo_beta: DPO inverse temperature for the ``dpo`` baseline.
        adversarial_fraction: share of anti-stereotypes also forgotten, per bias type (0.25).
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
        target_modules: LoRA targets; ``None`` detects attention + MLP projections per architecture.
        reference: ``adapter`` (the base under a disabled adapter, one copy in memory) or ``copy``
            (a frozen second model; forced by full fine-tuning).
        tolerance: stop when every val bias type's |SS - 50| is below it (2 points).
        phases: swap schedule rows ``(min_gap, lr_scale, scheduler_steps, eval_every)``.
        schedule_scale: multiplies the schedule's step counts (0.25 fits a few-hundred-step budget).
        eval_every: evaluation period of methods without dynamic swapping (0: only at start and end).
        val_clusters: val clusters scored per evaluation, stratified by bias type (``None``: all 863).
        checkpoint_every: steps between checkpoints.
        keep_best: save the adapter of the evaluation with the smallest worst val gap as the result
            (else the last step's).
        seed / split_seed: training seed and target-term split seed.
        dtype: ``fp32``, ``bf16`` autocast (fast only on hardware with bf16 units) or ``auto`` (bf16
            where the device does it natively fast, else fp32).  The trainer resolves ``auto`` and
            ``unlearn_config.json`` records the resolved dtype, with ``dtype_auto: true``.
        cpu: force the CPU even when an accelerator is present.
        stereoset: StereoSet name or file.
    """

    out: str
    model: str = DEFAULT_MODEL
    method: str = "biasunlearn"
    max_steps: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    alpha_forget: float = 0.5
    alpha_retain: float = 0.3
    alpha_kl: float = 0.2
    npo_beta: float = 0.1
    npo_reduction: str = "sequence"
    dpo_beta: float = 0.1
    adversarial_fraction: float = 0.25
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
    reference: str = "adapter"
    tolerance: float = 2.0
    phases: list[list[float]] = field(default_factory=lambda: [[p.min_gap, p.lr_scale, p.scheduler_steps, p.eval_every] for p in OFFICIAL_PHASES])
    schedule_scale: float = 0.25
    eval_every: int = 50
    val_clusters: int | None = 300
    checkpoint_every: int = 25
    keep_best: bool = True
    seed: int = 0
    split_seed: int = DEFAULT_SEED
    dtype: str = "fp32"
    cpu: bool = False
    stereoset: str = "stereoset"

    def __post_init__(self) -> None:
        method = get_method(self.method)
        parse_dtype(self.dtype)
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "max_length": self.max_length,
                    "checkpoint_every": self.checkpoint_every, "lora_r": self.lora_r, "kl_chunk_tokens": self.kl_chunk_tokens}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if min(self.lr, self.npo_beta, self.dpo_beta, self.max_grad_norm) <= 0:
            raise ValueError("lr, npo_beta, dpo_beta and max_grad_norm must be > 0")
        if min(self.alpha_forget, self.alpha_retain, self.alpha_kl, self.weight_decay, self.warmup_steps, self.eval_every) < 0:
            raise ValueError("loss weights, weight_decay, warmup_steps and eval_every must be >= 0")
        if not 0.0 <= self.adversarial_fraction <= 1.0:
            raise ValueError(f"adversarial_fraction must be in [0, 1], got {self.adversarial_fraction}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.npo_reduction not in NPO_REDUCTIONS:
            raise ValueError(f"unknown npo_reduction '{self.npo_reduction}'; valid: {', '.join(NPO_REDUCTIONS)}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode '{self.finetune}'; valid: {', '.join(FINETUNE_MODES)}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"unknown reference '{self.reference}'; valid: {', '.join(REFERENCE_MODES)}")
        if self.finetune == "full" and self.reference == "adapter" and method.reference_streams:
            raise ValueError("full fine-tuning has no adapter to disable: use reference='copy'")
        if self.val_clusters is not None and self.val_clusters < 1:
            raise ValueError(f"val_clusters must be >= 1 or None, got {self.val_clusters}")
        if self.kl_text_limit is not None and self.kl_text_limit < 0:
            raise ValueError(f"kl_text_limit must be >= 0 or None, got {self.kl_text_limit}")
        if self.tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")
        self.schedule()  # validates phases and schedule_scale

    def schedule(self) -> tuple[Phase, ...]:
        """The swap schedule as :class:`Phase` rows, step counts scaled by ``schedule_scale``."""
        try:
            phases = [Phase(float(a), float(b), int(c), int(d)) for a, b, c, d in self.phases]
        except (TypeError, ValueError):
            raise ValueError(f"phases must be rows of (min_gap, lr_scale, scheduler_steps, eval_every), got {self.phases}") from None
        if not phases or any(p.lr_scale <= 0 or p.scheduler_steps < 1 or p.eval_every < 1 for p in phases):
            raise ValueError(f"invalid swap schedule {self.phases}")
        return scaled_phases(phases, self.schedule_scale)

    def loss_weights(self) -> LossWeights:
        """The hyper-parameters the method's loss reads."""
        return LossWeights(self.alpha_forget, self.alpha_retain, self.alpha_kl, self.npo_beta, self.npo_reduction, self.dpo_beta)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UnlearnConfig":
        """Rebuild from :meth:`to_dict` output (unknown keys raise ``ValueError``).

        ``dtype_auto`` (a record in ``unlearn_config.json``: the saved dtype was chosen by ``auto``)
        is dropped; the saved, resolved ``dtype`` is kept.
        """
        data = {k: v for k, v in data.items() if k != "dtype_auto"}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UnlearnConfig fields {unknown}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "UnlearnConfig":
        """Read a config saved as JSON."""
        return cls.from_dict(json.loads(Path(path).read_text()))
