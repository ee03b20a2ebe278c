"""Training the RAM aligner ``Q`` on targets and offline proposal samples, with Accelerate.

The proposal never runs here (RAM's point: only ``Q`` is in the graph).  Each step scores a batch of
``B`` prompts twice in one concatenated forward: ``x + y`` (target, or DPO's chosen) and ``x + y'``
(the proposal sample, or DPO's rejected), takes per-sequence summed log-probs
(:func:`amendlm.ram.examples.pair_logps`) and applies a loss from :mod:`amendlm.ram.losses`.

The aligner starts from any same-vocabulary model (``aligner``) or from the first ``K`` layers of the
proposal (``init_from_proposal_layers``: embeddings, first K blocks, final norm, LM head).  It is
trained in full (default) or with LoRA (merged into the saved model at the end).  A seeded share of
the training prompts (``eval_fraction``, by id) is held out: the loss on it is logged before
training, at the end of every epoch, at the final step (and every ``eval_every`` steps).

Reruns: a run in ``OUT`` continues from its newest checkpoint with the same configuration only (a
different one is refused, naming the fields); a finished run is not trained again (the summary says
``already_finished``); log records past the checkpoint are dropped before they are redone.  Training
seconds (the summary's and the log's) add up across the resumed parts (each checkpoint records them);
time spent after the last checkpoint by a process that then died is not counted.  The
files are described in :mod:`amendlm.ram.run_dir`; ``aligner/`` is a plain transformers checkpoint +
tokenizer, loadable by name.

Preference pairs instead of a task (``pairs``, :mod:`amendlm.ram.preference`): e.g. StereoSet's train
targets, chosen = anti-stereotype, rejected = stereotype, encoded as raw text as the scorer encodes
them.  Such a run loads the proposal too (:class:`amendlm.ram.debias.DebiasControl`): a KL regulariser
on neutral text keeps the pair ``P_M * Q / Z`` near the proposal, and val-target evaluations of the
pair choose the aligner kept; ``zero_head`` starts the pair exactly at the proposal.  It runs in one
process.

Under ``accelerate launch`` ``batch_size`` stays the global micro-batch: each process scores its
share of it and the loss is computed on the gathered global batch (:mod:`amendlm.distributed`), so
N processes take the same optimizer steps as one; only the main process writes the log, the config
and the aligner, and every process writes its RNG state into the shared checkpoint.
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
from amendlm.ram import run_dir
from amendlm.ram.aligner_init import LORA_TARGETS, build_aligner, truncate_to_layers  # noqa: F401 (re-exported)
from amendlm.ram.data import TaskConfig
from amendlm.ram.examples import build_examples, heldout_ids, heldout_loss, pair_logps
from amendlm.ram.losses import LossConfig, get_loss
from amendlm.ram.preference import PairsConfig
from amendlm.resources import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """``align train``.

    Attributes:
        out: output directory (checkpoints, final ``aligner/``, logs).
        samples: the proposal samples jsonl of :mod:`amendlm.ram.sample` (``y'``; DPO's rejected).
        pairs: instead of ``task`` + ``samples``, preference pairs (:class:`amendlm.ram.preference.PairsConfig`:
            StereoSet train targets, the KL regulariser and the val selection).  Exactly one of the two.
        zero_head: give the aligner an all-zero output head of its own (:func:`amendlm.ram.aligner_init.zero_output_head`),
            so that the pair starts as the proposal.  False.
        aligner: initial aligner (name/path/hub id); ignored when ``init_from_proposal_layers`` is set.
        proposal: the proposal, for ``init_from_proposal_layers``.
        init_from_proposal_layers: ``K``: the aligner is the proposal's first K blocks.
        task: the training prompts and targets (``train`` split).
        loss: :class:`LossConfig` (``residual`` with alpha 1e-4, or ``dpo`` with beta 1).
        lora: train LoRA adapters (r, alpha, dropout below; attention + MLP projections) instead of
            all weights (default: all weights, as RAM trains its small aligner); merged into the saved aligner.
        learning_rate: AdamW peak LR, linear warmup (``warmup_ratio``) and decay. 1e-4.
        epochs, max_steps: optimizer steps = min(max_steps, epochs * batches / grad_accum).
        batch_size: prompts per micro-batch (2 sequences each). 8.
        save_every: optimizer steps between checkpoints (one is also written at the final step). 50.
        eval_fraction: share of the training prompts held out (by id, seeded by ``seed``) for the
            held-out loss; 0.05; 0 = none.
        eval_every: also log the held-out loss every N optimizer steps; 0 = only before training, at
            the end of each epoch and at the final step.
        dtype: ``auto`` (default: bf16 autocast where the device does bf16 natively fast, else fp32),
            ``fp32`` or ``bf16``; ``train_config.json`` records the resolved dtype and ``dtype_auto``.
        device: ``cpu`` (default), ``auto`` (an accelerator when Accelerate finds one, else the CPU) or an
            accelerator type without an index (``cuda``; under ``accelerate launch`` each process takes its
            own card).  Accelerate places the model; the initial aligner loads straight onto its device.
    """

    out: str
    samples: str | None = None
    pairs: PairsConfig | None = None
    zero_head: bool = False
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
    eval_fraction: float = 0.05
    eval_every: int = 0
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.samples is None) == (self.pairs is None):
            raise ValueError("give either proposal samples (--samples FILE, with --data) or preference pairs "
                             "(--pairs stereoset|FILE), not both and not neither")
        if self.aligner is None and self.init_from_proposal_layers is None:
            raise ValueError("give the initial aligner: --aligner MODEL, or --init-from-proposal-layers K for the "
                             "proposal's first K blocks (TrainConfig.aligner / init_from_proposal_layers)")
        if self.init_from_proposal_layers is not None and self.init_from_proposal_layers < 1:
            raise ValueError(f"init_from_proposal_layers must be >= 1, got {self.init_from_proposal_layers}")
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = at epoch ends only), got {self.eval_every}")
        parse_dtype(self.dtype)


def _micro_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    batches = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed + epoch).shuffle(order)
        batches += [order[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches


def check_inputs(config: TrainConfig) -> TrainConfig:
    """Every check that needs no model, run before any model loads: the initial model's name (an ``align
    train`` run directory given as ``aligner`` becomes its ``aligner/``), the samples file exists and was
    drawn for the prompts training builds, the data rows have their fields, and ``out`` holds no run with
    a different configuration.

    Returns:
        ``config`` with the resolved aligner path.

    Raises:
        FileNotFoundError, ValueError, amendlm.data.io.DataError: one line naming the option, file, row,
            field or differing options.
    """
    from dataclasses import replace

    from amendlm.ram.api import check_model_name, resolve_aligner
    from amendlm.ram.data import task_rows
    from amendlm.ram.preference import check_pairs

    if config.init_from_proposal_layers is not None or config.pairs is not None:
        check_model_name(config.proposal, "--proposal")
    if config.init_from_proposal_layers is None:
        config = replace(config, aligner=resolve_aligner(config.aligner))
    if config.pairs is not None:
        check_pairs(config.pairs)
    else:
        run_dir.check_samples(asdict(config.task), config.samples)
        task_rows(config.task)
    run_dir.check_resume(asdict(config), Path(config.out))
    return config


def training_examples(config: TrainConfig, tokenizer) -> list:
    """The :class:`amendlm.ram.examples.PairExample` s a run trains on: preference pairs, or task + samples."""
    if config.pairs is not None:
        from amendlm.ram.preference import encode_records, preference_records

        return encode_records(tokenizer, preference_records(config.pairs))
    return build_examples(config.task, config.samples, tokenizer)


def train_aligner(config: TrainConfig, progress: bool = False) -> dict:
    """Train the aligner (or report that ``config.out`` already holds this finished run).

    Args:
        progress: show a progress bar (tqdm, on stderr) over the optimizer steps.

    Returns:
        a summary: steps, total steps, examples (train / held out), last logged losses, last held-out
        loss, the aligner's path, ``already_finished`` (True when nothing was trained now), and wall-clock
        training seconds: ``seconds`` of the whole run (summed over its resumed parts, as each checkpoint
        records them), ``seconds_this_run`` of this process's part, ``seconds_complete`` (False when the run
        resumed from a checkpoint written before checkpoints recorded seconds: its earlier parts count 0).

    Raises:
        see :func:`check_inputs`; FloatingPointError: a non-finite training loss.
    """
    config = check_inputs(config)
    out = Path(config.out)
    finished = run_dir.finished_summary(out)
    if finished is not None:
        logger.info("%s is already finished (%d steps)", out, finished["steps"])
        return {**finished, "already_finished": True}
    return _train(config, out, progress)


def _train(config: TrainConfig, out: Path, progress: bool) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from amendlm.modeling import autocast, dtype_record, resolve_dtype
    from amendlm.report import atomic_write_json

    # split_batches: batch_size is the global batch, so the prepared scheduler steps once per optimizer
    # step (by default accelerate steps it once per process, for per-process batches)
    accelerator = Accelerator(cpu=config.device == "cpu", gradient_accumulation_steps=config.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    # "auto" times a probe per process: the main process's choice holds for all
    dtype = main_process_value(resolve_dtype(run_dir.resume_dtype(config.dtype, out), accelerator.device), accelerator)
    set_seed(config.seed)
    model, tokenizer = build_aligner(config, accelerator.device)  # config.device may be auto: Accelerate's choice
    examples = training_examples(config, tokenizer)
    held = heldout_ids([e.id for e in examples], config.eval_fraction, config.seed)
    heldout = [e for e in examples if e.id in held]
    examples = [e for e in examples if e.id not in held]
    pad_id = pad_token_id(tokenizer)
    per_epoch = math.ceil(len(examples) / config.batch_size)
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
    control = None
    if config.pairs is not None:
        if world > 1:
            raise ValueError("align train --pairs runs in one process (it also runs the proposal); launch it without "
                             "accelerate launch")
        from amendlm.ram.debias import DebiasControl

        control = DebiasControl(config, accelerator.unwrap_model(model), tokenizer, dtype, out)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_json(out / run_dir.CONFIG_FILE, {
            **asdict(config), **dtype_record(config.dtype, dtype), "n_examples": len(examples), "n_heldout": len(heldout),
            "total_steps": total_steps, "steps_per_epoch": per_epoch / config.grad_accum,
            "trainable_parameters": sum(p.numel() for p in params)})
    step, micro_start, state = 0, 0, None
    checkpoint = run_dir.latest_checkpoint(out)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        step, micro_start = state["step"], state["micro_batches"]
        if control is not None:
            control.load_state_dict(state.get("debias"))
        logger.info("resumed from %s (step %d)", checkpoint, step)
    if main:
        run_dir.truncate_log(out / run_dir.LOG_FILE, step if checkpoint is not None else None)
    seconds_before, seconds_complete = run_dir.seconds_before(state)
    began, last, last_heldout = time.perf_counter(), {}, None

    def seconds():  # training seconds of the whole run: its earlier parts (from the checkpoint) + this process's
        return seconds_before + time.perf_counter() - began
    bar = tqdm(total=total_steps, initial=step, desc="align train", unit="step", disable=not (progress and main))

    def write(log, record):
        if main:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate(log, micro_done):
        nonlocal last_heldout
        if not heldout:
            return
        values = heldout_loss(model, heldout, loss_fn, config.loss, pad_id, config.batch_size, dtype)
        last_heldout = {"event": "heldout", "step": step, "epoch": round(micro_done / per_epoch, 4),
                        "n_examples": len(heldout), **values, "seconds": seconds()}
        write(log, last_heldout)
        logger.info("step %d held-out loss %.4f", step, values["loss"])

    def validate(log):
        if control is not None and control.due(step, total_steps):
            write(log, control.validate(accelerator.unwrap_model(model), step, save=main))

    # the residual loss at alpha 0 (SFT) ignores the proposal samples: their half of each forward is skipped
    needs_negatives = not (config.loss.name == "residual" and config.loss.alpha == 0)
    model.train()
    with open(out / run_dir.LOG_FILE, "a", encoding="utf-8") if main else contextlib.nullcontext() as log:
        if step == 0:
            evaluate(log, 0)
            validate(log)
        for micro in range(micro_start, len(batches)):
            batch = [examples[i] for i in batches[micro]]
            share, placeholder = split_rows(batch, world, rank)
            with accelerator.accumulate(model), autocast(dtype, accelerator.device):
                local = pair_logps(model, share, pad_id, negatives=needs_negatives)
                anchor = zero_anchor(local.values()) if placeholder else 0.0
                scores = {k: gather_rows(v[:0] if placeholder else v, len(batch), accelerator) for k, v in local.items()}
                loss, parts = loss_fn(scores["positive_logps"], scores["negative_logps"], config.loss,
                                      scores["positive_n"], scores["negative_n"])  # the global batch's, in every process
                if not needs_negatives:
                    parts = {k: v for k, v in parts.items() if k != "sample_logp"}  # not computed (see above)
                kl = control.regulariser(model) if control is not None else None
                if kl is not None:  # + kl_weight * KL(P_M || pair) on neutral text
                    parts = {**parts, "pair_loss": loss.detach(), "kl": kl.detach()}
                    loss = loss + config.pairs.kl_weight * kl
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step} (micro-batch {micro}); lower the LR")
                accelerator.backward(data_parallel_loss(loss, accelerator) + anchor)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            synced = accelerator.sync_gradients
            if synced:
                step += 1
                last = {"event": "train", "step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                        "lr": scheduler.get_last_lr()[0], "seconds": seconds()}
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", refresh=False)
                if step % config.log_every == 0 or step == total_steps:
                    write(log, last)
                    logger.info("step %d/%d loss %.4f", step, total_steps, last["loss"])
            epoch_end = (micro + 1) % per_epoch == 0
            if epoch_end or (synced and (step == total_steps or (config.eval_every and step % config.eval_every == 0))):
                evaluate(log, micro + 1)
            if synced:
                validate(log)
            if synced and (step % config.save_every == 0 or step == total_steps):
                run_dir.save_checkpoint(accelerator, out, step, micro + 1,
                                        {"seconds": seconds(), "seconds_complete": seconds_complete,
                                         **({"debias": control.state_dict()} if control is not None else {})})
                if control is not None and main:
                    control.prune()
    bar.close()
    final_dir = out / "aligner"
    unwrapped = accelerator.unwrap_model(model)
    if control is not None:
        control.restore_best(unwrapped)  # the kept val evaluation's weights (the last step's without val)
    if config.lora:
        unwrapped = unwrapped.merge_and_unload()
    this_run = time.perf_counter() - began
    summary = {"steps": step, "total_steps": total_steps, "n_examples": len(examples), "n_heldout": len(heldout),
               "last": last, "heldout": last_heldout, "seconds": seconds_before + this_run, "seconds_this_run": this_run,
               "seconds_complete": seconds_complete, "aligner": str(final_dir),
               **({"selection": control.summary()} if control is not None else {})}
    if main:
        staging = out / ".aligner-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(final_dir, ignore_errors=True)
        staging.rename(final_dir)
        atomic_write_json(out / run_dir.SUMMARY_FILE, summary)
    return {**summary, "already_finished": False}
