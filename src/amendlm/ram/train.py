"""Training the RAM aligner ``Q`` on targets and offline proposal samples, with Accelerate.

The proposal never runs here (RAM's point: only ``Q`` is in the graph).  Each step scores a batch of
``B`` prompts twice in one concatenated forward: ``x + y`` (target, or DPO's chosen) and ``x + y'``
(the proposal sample, or DPO's rejected), takes per-sequence summed log-probs with
:func:`amendlm.scoring.sequence_logps` and applies a loss from :mod:`amendlm.ram.losses`.
Sequences are left-padded so every response sits in the last columns and the LM head only runs there
(``logits_to_keep``).

The aligner starts from any same-vocabulary model (``aligner``) or from the first ``K`` layers of the
proposal (``init_from_proposal_layers``: embeddings, first K blocks, final norm, LM head).  It is
trained in full or with LoRA (merged into the saved model at the end).  Checkpoints (model, optimizer,
scheduler, RNG, step) are written to a temporary directory and renamed into place; a rerun with the
same ``out`` resumes from the latest one.

Under ``accelerate launch`` ``batch_size`` stays the global micro-batch: each process scores its
share of it and the loss is computed on the gathered global batch (:mod:`amendlm.distributed`), so
N processes take the same optimizer steps as one; only the main process writes the log, the config
and the aligner, and every process writes its RNG state into the shared checkpoint.

Outputs in ``out``: ``aligner/`` (a plain transformers checkpoint + tokenizer, loadable by name),
``train_config.json``, ``train_log.jsonl``, ``checkpoints/step-N``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from amendlm.distributed import data_parallel_loss, gather_rows, main_process_value, split_rows, zero_anchor
from amendlm.modeling import pad_token_id, parse_dtype
from amendlm.ram.data import TaskConfig, encode_prompt, encode_response, load_task
from amendlm.ram.losses import LossConfig, get_loss
from amendlm.ram.sample import read_samples
from amendlm.report import atomic_directory
from amendlm.resources import DEFAULT_MODEL
from amendlm.scoring import EncodedPair, collate, sequence_logps

logger = logging.getLogger(__name__)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """``align train``.

    Attributes:
        out: output directory (checkpoints, final ``aligner/``, logs).
        samples: the proposal samples jsonl of :mod:`amendlm.ram.sample` (``y'``; DPO's rejected).
        aligner: initial aligner (name/path/hub id); ignored when ``init_from_proposal_layers`` is set.
        proposal: the proposal, for ``init_from_proposal_layers``.
        init_from_proposal_layers: ``K``: the aligner is the proposal's first K blocks.
        task: the training prompts and targets (``train`` split).
        loss: :class:`LossConfig` (``residual`` with alpha 1e-4, or ``dpo`` with beta 1).
        lora: train LoRA adapters (r, alpha, dropout below; attention + MLP projections) instead of
            all weights; merged into the saved aligner.
        learning_rate: AdamW peak LR, linear warmup (``warmup_ratio``) and decay. 1e-4.
        epochs, max_steps: optimizer steps = min(max_steps, epochs * batches / grad_accum).
        batch_size: prompts per micro-batch (2 sequences each), in all processes together (each of
            N ``accelerate launch`` processes scores about ``batch_size / N``). 8.
        save_every: optimizer steps between checkpoints. 50.
        dtype: ``fp32``, ``bf16`` autocast or ``auto`` (bf16 where the device does it natively fast,
            else fp32); ``train_config.json`` records the resolved dtype and ``dtype_auto``.
    """

    out: str
    samples: str
    aligner: str | None = None
    proposal: str = DEFAULT_MODEL
    init_from_proposal_layers: int | None = None
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    save_every: int = 50
    log_every: int = 5
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.aligner is None and self.init_from_proposal_layers is None:
            raise ValueError("give an aligner model or init_from_proposal_layers K")
        if self.init_from_proposal_layers is not None and self.init_from_proposal_layers < 1:
            raise ValueError(f"init_from_proposal_layers must be >= 1, got {self.init_from_proposal_layers}")
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        parse_dtype(self.dtype)


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


def build_aligner(config: TrainConfig):
    """``(model, tokenizer)`` of the initial aligner (full weights trainable, or LoRA-wrapped)."""
    from amendlm.modeling import load_model

    if config.init_from_proposal_layers is not None:
        model, tokenizer = load_model(config.proposal, device=config.device)
        truncate_to_layers(model, config.init_from_proposal_layers)
    else:
        model, tokenizer = load_model(config.aligner, device=config.device)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name, _ in model.named_modules())]
        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    return model, tokenizer


@dataclass(frozen=True)
class PairExample:
    """One training prompt: ``x + y`` (positive) and ``x + y'`` (negative) as :class:`EncodedPair` s."""

    id: str
    positive: EncodedPair
    negative: EncodedPair


def build_examples(config: TrainConfig, tokenizer) -> list[PairExample]:
    """Join the task's training records with their proposal samples by id.

    A sample is re-tokenized from its text: ``tokens(y') + [EOS]`` when it ended (EOS or stop string),
    ``tokens(y')`` when it hit ``max_new_tokens`` (so the aligner is not taught an ending it never saw).

    Raises:
        ValueError: no training record has a sample (names both files).
    """
    records = load_task(config.task, tokenizer)
    samples = read_samples(config.samples)
    examples = []
    for record in records:
        sample = samples.get(record.id)
        if sample is None or not str(sample["sample"]).strip():
            continue
        prompt = encode_prompt(tokenizer, record.prompt, config.task.chat_template)
        target = encode_response(tokenizer, record.response)
        negative = tokenizer(sample["sample"].strip(), add_special_tokens=False)["input_ids"]
        if sample.get("finish_reason") != "length":
            negative.append(tokenizer.eos_token_id)
        examples.append(PairExample(record.id, EncodedPair(prompt + target, len(target)),
                                    EncodedPair(prompt + negative, len(negative))))
    if not examples:
        raise ValueError(f"no record of {config.task.data} ({config.task.split}) has a sample in {config.samples}")
    missing = len(records) - len(examples)
    if missing:
        logger.warning("%d of %d training prompts have no (non-empty) sample and are skipped", missing, len(records))
    return examples


def pair_logps(model, batch: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One forward over ``[x+y ...; x+y' ...]`` -> summed log-probs and token counts of each half.

    Returns:
        dict of ``(batch,)`` tensors ``positive_logps, negative_logps, positive_n, negative_n``.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in collate([e.positive for e in batch] + [e.negative for e in batch],
                                                 pad_id, padding_side="left").items()}
    loss_mask = inputs.pop("loss_mask")
    keep = int(loss_mask.sum(-1).max()) + 1  # left padding: scored tokens are in the last columns
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (2B, keep, vocab)
    logps, n_tokens = sequence_logps(logits, inputs["input_ids"][:, -keep:], loss_mask[:, -keep:])
    half = len(batch)
    return {"positive_logps": logps[:half], "negative_logps": logps[half:],
            "positive_n": n_tokens[:half], "negative_n": n_tokens[half:]}


def _micro_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    batches = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        batches += [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches


def _latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in (out / "checkpoints").glob("step-*")
            if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(accelerator, out: Path, step: int, micro: int) -> None:
    """Every process calls this: the main one stages the directory, all write into it (accelerate
    saves the weights, optimizer and scheduler from the main process and each process's RNG
    state), then the main one renames it into place and removes the older checkpoint."""
    root = out / "checkpoints"
    final = root / f"step-{step:06d}"
    main = accelerator.is_main_process
    with atomic_directory(final) if main else contextlib.nullcontext() as staging:
        staging = Path(main_process_value(str(staging) if main else None, accelerator))
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # all RNG files are in before the rename
        if main:
            (staging / "trainer_state.json").write_text(json.dumps({"step": step, "micro_batches": micro}))
    if main:
        for old in root.glob("step-*"):  # keep only the newest checkpoint
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train_aligner(config: TrainConfig) -> dict:
    """Train the aligner; returns a summary (steps, final losses, seconds, output paths)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from transformers import get_linear_schedule_with_warmup

    from amendlm.modeling import autocast, dtype_record, resolve_dtype
    from amendlm.report import atomic_write_json

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    # split_batches: batch_size is the global batch, so the prepared scheduler steps once per optimizer
    # step (by default accelerate steps it once per process, for per-process batches)
    accelerator = Accelerator(cpu=config.device == "cpu", gradient_accumulation_steps=config.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    dtype = main_process_value(resolve_dtype(config.dtype, accelerator.device), accelerator)  # "auto" times per process
    set_seed(config.seed)
    model, tokenizer = build_aligner(config)
    examples = build_examples(config, tokenizer)
    pad_id = pad_token_id(tokenizer)
    batches = _micro_batches(len(examples), config.batch_size, config.epochs, config.seed)
    total_steps = math.ceil(len(batches) / config.grad_accum)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
        batches = batches[: total_steps * config.grad_accum]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_fn = get_loss(config.loss.name)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if main:
        atomic_write_json(out / "train_config.json", {**asdict(config), **dtype_record(config.dtype, dtype), "n_examples": len(examples),
                                                 "total_steps": total_steps, "trainable_parameters": sum(p.numel() for p in params)})
    step, micro_start = 0, 0
    checkpoint = _latest_checkpoint(out)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, micro_start = state["step"], state["micro_batches"]
        logger.info("resumed from %s (step %d)", checkpoint, step)
    model.train()
    began, last = time.perf_counter(), {}
    with open(out / "train_log.jsonl", "a", encoding="utf-8") if main else contextlib.nullcontext() as log:
        for micro in range(micro_start, len(batches)):
            batch = [examples[i] for i in batches[micro]]
            share, placeholder = split_rows(batch, world, rank)
            with accelerator.accumulate(model), autocast(dtype, accelerator.device):
                local = pair_logps(model, share, pad_id)
                anchor = zero_anchor(local.values()) if placeholder else 0.0
                scores = {k: gather_rows(v[:0] if placeholder else v, len(batch), accelerator) for k, v in local.items()}
                loss, parts = loss_fn(scores["positive_logps"], scores["negative_logps"], config.loss,
                                      scores["positive_n"], scores["negative_n"])  # the global batch's, in every process
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step} (micro-batch {micro}); lower the LR")
                accelerator.backward(data_parallel_loss(loss, accelerator) + anchor)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            last = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                    "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - began}
            if main and (step % config.log_every == 0 or step == total_steps):
                log.write(json.dumps(last) + "\n")
                log.flush()
                logger.info("step %d/%d loss %.4f", step, total_steps, last["loss"])
            if step % config.save_every == 0 and step < total_steps:
                _save_checkpoint(accelerator, out, step, micro + 1)
    final_dir = out / "aligner"
    unwrapped = accelerator.unwrap_model(model)
    if config.lora:
        unwrapped = unwrapped.merge_and_unload()
    if accelerator.is_main_process:
        staging = out / ".aligner-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(final_dir, ignore_errors=True)
        staging.rename(final_dir)
    return {"steps": step, "total_steps": total_steps, "n_examples": len(examples), "last": last,
            "seconds": time.perf_counter() - began, "aligner": str(final_dir)}
