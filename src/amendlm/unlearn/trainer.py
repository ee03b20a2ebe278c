"""The unlearning loop: Accelerate + PEFT LoRA (or full fine-tuning), one loop for every method.

Each step draws one batch of every stream the method declares, runs the reference pass
(the same model with the adapter disabled, in eval mode under ``no_grad``) and the policy pass
(train mode: dropout on), hands the log-probs to the method's pure loss, clips and steps AdamW
under a linear learning-rate schedule.  BiasUnlearn additionally evaluates SS per bias type on
the val targets and applies the swap schedule of :mod:`amendlm.unlearn.schedule`; a bias type
the focus returns to continues its streams where they stopped.  The same code runs under
``accelerate launch``: the batch sizes are those of the global batch, each process runs the model
on its share of it and the loss is computed on the gathered global batch, so N processes take the
same steps as one (:mod:`amendlm.distributed`); only the main process writes files.

The pieces it drives live beside it: :mod:`~amendlm.unlearn.models` (LoRA, the reference
pass), :mod:`~amendlm.unlearn.forward` (the policy and reference passes of a step, padded or
packed), :mod:`~amendlm.unlearn.streams` (tokenized streams and their samplers),
:mod:`~amendlm.unlearn.evaluation` (val scores), :mod:`~amendlm.unlearn.resume` (run-directory
and resume checks, SIGTERM) and :mod:`~amendlm.unlearn.artifacts` (the files of a run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from amendlm.data.splits import select_split
from amendlm.data.stereoset import StereoSetCluster, load_stereoset
from amendlm.distributed import data_parallel_loss, every_process_value, main_process_value
from amendlm.modeling import dtype_name, pad_token_id, resolve_dtype
from amendlm.report import atomic_write_json, package_versions
from amendlm.scoring import EncodedPair
from amendlm.unlearn import artifacts
from amendlm.unlearn.config import UnlearnConfig
from amendlm.unlearn.data import build_sets, text_chunks
from amendlm.unlearn.evaluation import eval_record, lms_qualifies, stratified_sample, val_sample, val_scores
from amendlm.unlearn.forward import StepPasses
from amendlm.unlearn.methods import Method, get_method
from amendlm.unlearn.models import attach_lora, frozen_copy, lora_target_modules
from amendlm.unlearn.resume import check_resume_config, check_run_directory, resume_dtype, sigterm_as_interrupt
from amendlm.unlearn.schedule import decide, types_to_train
from amendlm.unlearn.state import TrainResult, TrainState, learning_rate
from amendlm.unlearn.streams import StreamSampler, StreamSamplers, encode_examples, encode_streams, sampler_key, sampler_tag

__all__ = [  # the streams, evaluation and resume helpers are re-exported for existing imports
    "TrainResult", "TrainState", "UnlearnTrainer", "learning_rate", "lora_target_modules", "train",
    "StreamSampler", "encode_examples", "stratified_sample", "val_scores",
    "check_resume_config", "check_run_directory", "resume_dtype",
]

logger = logging.getLogger(__name__)


class UnlearnTrainer:
    """One run of :class:`UnlearnConfig` on a given model, tokenizer and StereoSet clusters.

    ``model`` is a plain causal LM; LoRA is attached here (``finetune='lora'``).
    ``clusters`` are all StereoSet clusters; the train and val targets are taken from them.
    """

    def __init__(self, config: UnlearnConfig, model, tokenizer, clusters: Sequence[StereoSetCluster],
                 general_texts: Sequence[str] = ()):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.tokenizer = tokenizer
        self.method: Method = get_method(config.method)
        self.accelerator = Accelerator(cpu=config.cpu or config.device == "cpu")
        # "auto" times bf16 in each process; the main process's choice holds for all
        self.dtype = main_process_value(resolve_dtype(config.dtype, self.accelerator.device), self.accelerator)
        # "auto" is decided here once; the config (saved, compared on --resume, used by val_scores) holds the decision
        self.dtype_auto = config.dtype == "auto"
        self.config = config = replace(config, dtype=dtype_name(self.dtype))
        set_seed(config.seed)
        self.out = Path(config.out)
        self.train_clusters = select_split(clusters, "train", config.split_seed)
        self.val_clusters = val_sample(select_split(clusters, "val", config.split_seed), config)
        if not self.train_clusters or not self.val_clusters:
            raise ValueError("the target-term split left no train or no val clusters")
        self.general = text_chunks(general_texts, tokenizer, config.kl_chunk_tokens) if "kl" in self.method.streams else []
        self.pad_id = pad_token_id(tokenizer)
        self.reference_model = None
        if self.method.reference_streams and config.reference == "copy":
            self.reference_model = frozen_copy(model)
        if config.finetune == "lora":
            model = attach_lora(model, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.reference_model is not None:
            self.reference_model.to(self.accelerator.device)
        self.state = TrainState(phase_steps=config.initial_scheduler_steps or config.max_steps)
        self._began, self._seconds_before = time.perf_counter(), 0.0  # set again by train()
        self.sampler_pool = StreamSamplers(config.seed)
        self.passes = StepPasses(self.accelerator, self.model, self.reference_model, self.dtype, self.pad_id, self.method,
                                 config.packing, max_tokens=config.max_length)
        if self.passes.fallback:
            logger.warning("packing off: %s; padded batches instead (reference log-probs still cached)", self.passes.fallback)
        self._build_streams()

    # ------------------------------------------------------------------ data
    def _build_streams(self) -> None:
        """(Re)build the example streams for the current focus / swap state."""
        c, s = self.config, self.state
        fraction = c.adversarial_fraction if self.method.adversarial else 0.0
        trained = s.trained_types
        sets = build_sets(self.train_clusters, fraction, c.seed, s.swapped_type_names, trained, self.general,
                          c.kl_unrelated)
        self.sizes = sets.sizes()
        self.streams = encode_streams(self.tokenizer, sets, self.method.streams, c.max_length, c.loss_tokens)
        # a revisited focus continues its samplers; chosen/rejected share one so pairs stay aligned
        tag = "+".join(trained) if trained else None
        self.samplers = {name: self.sampler_pool.sampler(sampler_tag(name, tag, s.swap), len(self.streams[name]))
                         for name in self.method.streams}

    def _next_batches(self) -> dict[str, list[EncodedPair]]:
        """One global batch of every stream (the same in every process: the samplers are seeded alike)."""
        batches, drawn = {}, {}
        for name in self.method.streams:
            key = sampler_key(name)
            if key not in drawn:
                drawn[key] = self.samplers[name].take(self.config.stream_batch_size(name, self.state.swapped))
            batches[name] = [self.streams[name][i] for i in drawn[key]]
        return batches

    # ------------------------------------------------------------------ evaluation and swapping
    def _evaluate(self, log: artifacts.StepLog, apply_schedule: bool = True) -> dict:
        """Score the val clusters, track the best step, and (BiasUnlearn) apply the swap rule.

        The end-of-budget evaluation passes ``apply_schedule=False`` so that a run stopped by
        ``max_steps`` and resumed with a larger budget follows the uninterrupted run exactly.
        """
        scores = val_scores(self.accelerator.unwrap_model(self.model), self.tokenizer, self.val_clusters, self.config)
        # the main process's scores in every process, so that stop / focus / swap decisions agree (scores
        # computed on different devices could differ in the last bit near a threshold)
        scores = main_process_value(scores, self.accelerator)
        record = eval_record(self.state.step, scores)
        types = {name: ss for name, ss in record["ss"].items() if name != "overall"}
        s, c = self.state, self.config
        self._track_best(record)
        if apply_schedule and self.method.dynamic_swap and s.step < c.initial_all_types_steps:
            # every bias type together until then; no decision (evaluations only recorded, every initial_eval_every)
            s.next_eval = min(c.initial_all_types_steps, s.step + (c.initial_eval_every or c.initial_all_types_steps))
        elif apply_schedule and self.method.dynamic_swap:
            decision = decide(types, c.tolerance, c.schedule(s.step))
            record["decision"] = {"stop": decision.stop, "focus": decision.focus, "swap": decision.swap, "gap": decision.gap}
            if decision.stop:
                s.status = "stopped"
            else:
                if c.type_focus == "all":  # every type outside the tolerance, each towards 50 by its own val SS
                    active, swapped_types = types_to_train(types, c.tolerance, c.rest_within)
                    resting = sorted(t for t, ss in types.items() if abs(ss - 50.0) >= c.tolerance and t not in active)
                    record["decision"].update(focus=None, swap=False, active_types=active, swapped_types=swapped_types,
                                              resting_types=resting)
                    changed = (active, swapped_types) != (s.active_types, s.swapped_types)
                    s.active_types, s.swapped_types = active, swapped_types
                else:
                    changed = (decision.focus, decision.swap) != (s.focus, s.swap)
                    s.focus, s.swap = decision.focus, decision.swap
                s.lr_scale, s.phase_start, s.phase_steps = decision.phase.lr_scale, s.step, decision.phase.scheduler_steps
                s.next_eval = s.step + decision.phase.eval_every
                if c.fresh_optimizer_per_phase:
                    self._fresh_optimizer()
                if changed:
                    self._build_streams()
        elif apply_schedule:
            s.next_eval = s.step + c.eval_every if c.eval_every else c.max_steps
        log.write(record)
        return scores

    def _track_best(self, record: dict) -> None:
        """Update the kept evaluation (by ``selection``) and the smallest-gap one; snapshot their weights."""
        s, c = self.state, self.config
        gap, lms = record["worst_gap"], record["lms"]["overall"]
        if s.base_lms is None:
            s.base_lms = lms
        record["lms_drop"] = drop = s.base_lms - lms
        save = c.keep_best and self.accelerator.is_main_process
        if s.gap_best_gap is None or gap < s.gap_best_gap:
            s.gap_best_gap, s.gap_best_step, s.gap_best_lms_drop = gap, s.step, drop
            if save and c.selection != "gap":  # the fallback when no evaluation qualifies
                artifacts.save_weights(self.out / "best_gap", self.accelerator.unwrap_model(self.model))
        if lms_qualifies(drop, c.selection, c.max_lms_drop) and (s.best_gap is None or gap < s.best_gap):
            s.best_gap, s.best_step, s.best_lms_drop = gap, s.step, drop
            if save:
                artifacts.save_weights(self.out / "best", self.accelerator.unwrap_model(self.model))

    def _fresh_optimizer(self) -> None:
        """Drop AdamW's moments and step counts: the same as building a new optimizer (official code)."""
        getattr(self.optimizer, "optimizer", self.optimizer).state.clear()

    # ------------------------------------------------------------------ the loop
    def _checkpoint(self, interrupted: bool = False) -> None:
        """Save the checkpoint (main process), with every process's RNG state.

        ``interrupted``: a signal may have caught the processes at different points, so nothing
        waits for the others; the main process saves its own RNG state only (the others resume
        from it).
        """
        self.state.samplers = self.sampler_pool.state_dict()
        self.state.seconds = self._seconds_before + time.perf_counter() - self._began
        self.state.reference_cache = self.passes.cache.state_dict() if self.passes.cache is not None else []
        together = not interrupted and self.accelerator.num_processes > 1
        rng_states = every_process_value(artifacts.rng_state(), self.accelerator) if together else [artifacts.rng_state()]
        if self.accelerator.is_main_process:
            artifacts.save_checkpoint(self.out / "checkpoint", self.accelerator.unwrap_model(self.model),
                                      self.optimizer, self.state.__dict__, rng_states)
        if together:
            self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        saved = artifacts.load_checkpoint(self.out / "checkpoint", self.accelerator.unwrap_model(self.model), self.optimizer,
                                          self.accelerator.process_index)
        self.state = TrainState(**saved)
        if "seconds" not in saved:  # a checkpoint written before checkpoints recorded the seconds
            self.state.seconds_complete = False
        self._seconds_before = self.state.seconds
        if self.state.status != "stopped":  # a run ended by the stop rule stays ended
            self.state.status = "running"
        if not self.method.dynamic_swap:  # a larger --max-steps stretches the linear decay
            self.state.phase_steps = self.config.initial_scheduler_steps or self.config.max_steps
        # older checkpoints keyed the current focus's samplers by stream name
        s = self.state
        self.sampler_pool.load_state_dict({(tag if ":" in tag else sampler_tag(tag, s.focus, s.swap)): state
                                           for tag, state in s.samplers.items()})
        if self.passes.cache is not None:
            self.passes.cache.load_state_dict(self.state.reference_cache)
        self._build_streams()

    def train(self, resume: bool = False, on_record: Callable[[dict], None] | None = None) -> TrainResult:
        """Run until ``max_steps``, the stop rule, a NaN, or Ctrl-C / SIGTERM; write every output file.

        ``on_record`` receives every ``log.jsonl`` record as it is written (step and eval records;
        :class:`amendlm.unlearn.progress.RunProgress` shows them).

        Ctrl-C (SIGINT) and SIGTERM save a checkpoint and the current weights, then return with
        status ``interrupted``.  The result's ``seconds`` sum the run's parts (each checkpoint records
        them); ``seconds_this_run`` are this invocation's.  (Jobs started in the background by a non-interactive shell
        ignore SIGINT; stop those with ``kill -TERM``.)

        Raises:
            FileExistsError: ``out`` already holds a run and ``resume`` is off (nothing is overwritten).
            FileNotFoundError: ``resume`` without a checkpoint in ``out/checkpoint``.
            ValueError: ``resume`` with a different saved configuration.
        """
        c, began = self.config, time.perf_counter()
        self._began, self._seconds_before = began, 0.0  # _resume adds the seconds of the run's earlier parts
        config_file = self.out / "unlearn_config.json"
        main = self.accelerator.is_main_process
        check_run_directory(self.out, resume)
        if resume:
            check_resume_config(c, resume)
        self.accelerator.wait_for_everyone()  # every process has checked the directory before the main one writes
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        if main:
            atomic_write_json(config_file, {**c.to_dict(), "dtype_auto": self.dtype_auto})
        log = artifacts.StepLog(self.out / "log.jsonl", self.state.step if resume else None, on_record, enabled=main)
        last_val = None
        try:
            with sigterm_as_interrupt():
                last_val = self._run(log, resume)
        except KeyboardInterrupt:
            self.state.status = "interrupted"
            self._checkpoint(interrupted=True)
            logger.warning("interrupted at step %d; checkpoint saved, continue with --resume", self.state.step)
        return self._finish(log, last_val, time.perf_counter() - began)

    def _run(self, log: artifacts.StepLog, resume: bool) -> dict | None:
        """The loop: evaluate, step, evaluate on schedule, checkpoint; returns the last val scores."""
        c, last_val = self.config, None
        if not resume:
            last_val = self._evaluate(log)
        while self.state.step < c.max_steps and self.state.status == "running":
            self.train_step(log)
            if self.state.status != "running":
                break
            if self.state.step >= self.state.next_eval:
                last_val = self._evaluate(log)
            elif self.state.step == c.max_steps:
                last_val = self._evaluate(log, apply_schedule=False)
            if self.state.step % c.checkpoint_every == 0 or self.state.step == c.max_steps or self.state.status == "stopped":
                self._checkpoint()
        if self.state.status == "running":
            self.state.status = "completed"
        return last_val

    def train_step(self, log: artifacts.StepLog) -> None:
        """One optimizer step on one batch of every stream; sets ``state.status = 'nan'`` instead of stepping on a non-finite loss or gradient."""
        c, s = self.config, self.state
        began = time.perf_counter()
        lr = learning_rate(c, s, s.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        outputs, anchor = self.passes.global_outputs(self._next_batches())
        loss, parts = self.method.loss(outputs, c.loss_weights())  # the global batch's loss, the same in every process
        if not torch.isfinite(loss):
            self._stop_nan(log, "loss")
            return
        self.accelerator.backward(data_parallel_loss(loss, self.accelerator) + anchor)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = float("inf") if c.max_grad_norm is None else c.max_grad_norm  # inf: measured, not clipped
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            self._stop_nan(log, "gradient norm")
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        log.write({"step": s.step, "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()},
                   "lr": lr, "grad_norm": float(grad_norm), "focus": s.focus, "swap": s.swap,
                   "seconds": round(time.perf_counter() - began, 3)})

    def _stop_nan(self, log: artifacts.StepLog, what: str) -> None:
        self.state.status = "nan"
        self.optimizer.zero_grad(set_to_none=True)
        logger.error("non-finite %s at step %d; stopping, last checkpoint kept", what, self.state.step + 1)
        log.write({"step": self.state.step, "event": "nan", "what": what})
        checkpoint = artifacts.find_checkpoint(self.out / "checkpoint")
        if checkpoint is not None:  # the weights in memory may be the cause; fall back to the last good ones
            artifacts.load_weights(checkpoint, self.accelerator.unwrap_model(self.model))

    def _finish(self, log: artifacts.StepLog, last_val: dict | None, this_run: float) -> TrainResult:
        s, c = self.state, self.config
        seconds = (self._seconds_before + this_run, this_run, s.seconds_complete)  # the whole run's, this invocation's
        model = self.accelerator.unwrap_model(self.model)
        best = self.out / "best"
        if c.keep_best and s.best_step is None and s.gap_best_step is not None:
            logger.warning("no evaluation kept the val LMS within %.1f of step 0; keeping the smallest gap "
                           "(step %d) instead", c.max_lms_drop, s.gap_best_step)
            best, s.best_step, s.best_gap, s.best_lms_drop = (self.out / "best_gap", s.gap_best_step,
                                                              s.gap_best_gap, s.gap_best_lms_drop)
        use_best = c.keep_best and s.status != "interrupted" and (best / "trainable.safetensors").is_file()
        if self.accelerator.is_main_process:
            if use_best:
                artifacts.load_weights(best, model)
            model.save_pretrained(str(self.out), safe_serialization=True)  # adapter or full model
            if c.finetune == "full" and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(str(self.out))
            records = artifacts.read_log(self.out / "log.jsonl")
            artifacts.plot_ss(records, self.out / "ss_per_type.png", c.tolerance, f"{c.method} on {c.model}")
            evals = [r for r in records if r.get("event") == "eval"]
            if last_val is None and evals:  # e.g. a resumed run that evaluated before the checkpoint
                last_val = {name: {"ss": ss, "lms": evals[-1]["lms"][name]} for name, ss in evals[-1]["ss"].items()}
            result = TrainResult(s.status, s.step, str(self.out), s.best_step, last_val, *seconds)
            atomic_write_json(self.out / "summary.json", {
                **result.__dict__, "weights_saved": f"best (step {s.best_step})" if use_best else f"last (step {s.step})",
                "selection": {"rule": c.selection, "max_lms_drop": c.max_lms_drop, "base_lms": s.base_lms,
                              "selected": {"step": s.best_step, "worst_gap": s.best_gap, "lms_drop": s.best_lms_drop},
                              "smallest_gap": {"step": s.gap_best_step, "worst_gap": s.gap_best_gap,
                                               "lms_drop": s.gap_best_lms_drop}},
                "data_sizes": self.sizes, "train_clusters": len(self.train_clusters),
                "val_clusters": len(self.val_clusters), "versions": package_versions(),
                **({"packing": {"packed_rows": self.passes.packed, "fallback": self.passes.fallback}} if c.packing else {}),
            })
            return result
        return TrainResult(s.status, s.step, str(self.out), s.best_step, last_val, *seconds)


def train(config: UnlearnConfig, resume: bool = False, on_record: Callable[[dict], None] | None = None) -> TrainResult:
    """Load the model and data named by ``config`` and run :class:`UnlearnTrainer` (``on_record``:
    see :meth:`UnlearnTrainer.train`).

    Example::

        from amendlm.unlearn.config import UnlearnConfig
        from amendlm.unlearn.trainer import train
        result = train(UnlearnConfig(out="runs/bu", method="biasunlearn", max_steps=200))
    """
    from amendlm.data.text import load_texts
    from amendlm.modeling import load_model

    check_run_directory(config.out, resume)  # before the expensive loading
    config = resume_dtype(config, resume)
    texts = (load_texts(config.kl_texts, field=config.kl_text_field, field_option="kl_text_field")
             if config.kl_texts else [])  # a bad file: before the model loads
    model, tokenizer = load_model(config.model)
    texts = texts[: config.kl_text_limit] if config.kl_text_limit is not None else texts
    trainer = UnlearnTrainer(config, model, tokenizer, load_stereoset(config.stereoset), texts)
    return trainer.train(resume=resume, on_record=on_record)
