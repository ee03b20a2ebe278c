"""A distillation warm-up of a small aligner built from the proposal's first K layers.

Cutting a decoder to its first K blocks (plus its final norm and head, :func:`amendlm.ram.train.truncate_to_layers`)
leaves a model whose next-token distributions are far from any language model's.  Before it is trained
on a task, a short warm-up teaches it to predict like the proposal: on plain text, the loss at every
position is ``KL(P_M || Q)`` (:func:`amendlm.ram.losses.token_kl`), the proposal frozen and run without
gradients.  The text is the task's training documents (news text for XSum; never a summary, and without the
documents of the prompts ``align train`` will hold out, ``holdout``, so the val split stays unseen) or any
text dataset (``texts``).

Outputs in ``out``: ``aligner/`` (model + tokenizer), ``distill_config.json``, ``distill_log.jsonl`` and
``distill_summary.json`` (written last; a rerun of a finished warm-up returns it and trains nothing).
The warm-up is short and not checkpointed: an interrupted one starts again.  A finished one in ``out``
made with another configuration is refused, not returned.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from amendlm.modeling import parse_dtype
from amendlm.ram.data import TaskConfig
from amendlm.ram.validation import ValSplit
from amendlm.resources import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The warm-up of a ``layers``-block aligner cut from ``proposal``.

    Attributes:
        out: output directory.
        proposal: the teacher, and the model the aligner is cut from.
        layers: ``K``, blocks kept. 8.
        task: whose ``train`` documents are the text when ``texts`` is ``None``.
        texts: a text dataset (``text`` field, e.g. ``wikitext-sample``) instead of the task's documents.
        holdout: the prompts the ``align train`` run that starts from this aligner holds out (its
            ``--eval-fraction``, ``--seed``, ``--samples`` and ``--limit``: :meth:`ValSplit.of_training`);
            their documents are left out of the task's, so ``align eval --split val`` scores unseen
            prompts.  Default: ``align train``'s defaults without a samples file.  None: every document.
        max_tokens: tokens per text (cut). 128.
        steps, batch_size, learning_rate: AdamW, linear warm-up over the first 5 % then decay. 200, 8, 1e-4.
        seed: text order and initialisation.
        dtype, device: as :class:`amendlm.ram.train.TrainConfig`.
    """

    out: str
    proposal: str = DEFAULT_MODEL
    layers: int = 8
    task: TaskConfig = field(default_factory=TaskConfig)
    texts: str | None = None
    holdout: ValSplit | None = field(default_factory=ValSplit)
    max_tokens: int = 128
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-4
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("layers", "max_tokens", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        parse_dtype(self.dtype)


def warmup_texts(config: DistillConfig) -> list[str]:
    """The warm-up texts: ``texts`` (its ``text`` field), or the documents of the task's ``train`` split
    but those of ``holdout``'s prompts.

    Raises:
        FileNotFoundError: ``holdout.samples`` names no file (:func:`amendlm.ram.validation.heldout_rows`).
    """
    from dataclasses import replace

    from amendlm.data.text import load_texts
    from amendlm.ram.data import task_rows
    from amendlm.ram.validation import heldout_rows

    if config.texts is not None:
        return load_texts(config.texts)
    held = {row["id"] for row in heldout_rows(config.task, config.holdout)[0]} if config.holdout else set()
    return [row["prompt"] for row in task_rows(replace(config.task, split="train", limit=None)) if row["id"] not in held]


def distill_aligner(config: DistillConfig, progress: bool = False) -> dict:
    """Run the warm-up (or return the summary of the finished one in ``config.out``).

    Returns:
        a summary: steps, first and last logged loss (nats per position), seconds, the aligner's path.

    Raises:
        ValueError: ``out`` holds a finished warm-up whose ``distill_config.json`` differs from ``config``.
        FileNotFoundError: see :func:`warmup_texts`.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from amendlm.modeling import autocast, dtype_record, load_model, resolve_dtype, start_token_id
    from amendlm.ram.losses import token_kl
    from amendlm.ram.train import truncate_to_layers
    from amendlm.report import atomic_write_json

    out = Path(config.out)
    if (out / "distill_summary.json").is_file() and (out / "aligner" / "config.json").is_file():
        saved = json.loads((out / "distill_config.json").read_text())
        differs = sorted(k for k, v in json.loads(json.dumps(asdict(config))).items()
                         if k != "dtype" and saved.get(k, None if k == "holdout" else v) != v)
        if differs:
            raise ValueError(f"{out}: a finished warm-up with another configuration ({', '.join(differs)} differ "
                             f"from {out / 'distill_config.json'}); use another out directory or delete it")
        return {**json.loads((out / "distill_summary.json").read_text()), "already_finished": True}
    texts = warmup_texts(config)
    teacher, tokenizer = load_model(config.proposal, device=config.device)
    torch.manual_seed(config.seed)
    student, _ = load_model(config.proposal, device=config.device)
    truncate_to_layers(student, config.layers).train()
    dtype = resolve_dtype(config.dtype, next(student.parameters()).device)
    start = start_token_id(tokenizer)
    encoded = [[start, *tokenizer(t, add_special_tokens=False)["input_ids"][: config.max_tokens - 1]] for t in texts]
    encoded = [ids for ids in encoded if len(ids) > 1]
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, config.steps // 20), config.steps)
    rng, device = random.Random(config.seed), next(student.parameters()).device
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "distill_config.json", {**asdict(config), **dtype_record(config.dtype, dtype), "n_texts": len(encoded)})
    began, first, last = time.perf_counter(), None, None
    with open(out / "distill_log.jsonl", "w", encoding="utf-8") as log:
        for step in tqdm(range(1, config.steps + 1), desc="align distill", unit="step", disable=not progress):
            batch = rng.sample(encoded, min(config.batch_size, len(encoded)))
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([ids + [start] * (width - len(ids)) for ids in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
            with autocast(dtype, device):
                with torch.no_grad():
                    teacher_logps = teacher(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
                student_logps = student(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
            loss = token_kl(teacher_logps, student_logps, mask.bool())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            last = {"event": "distill", "step": step, "kl": loss.item(), "seconds": time.perf_counter() - began}
            first = first or last
            log.write(json.dumps(last) + "\n")
    staging, final = out / ".aligner-tmp", out / "aligner"
    shutil.rmtree(staging, ignore_errors=True)
    student.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    summary = {"steps": config.steps, "first": first, "last": last, "seconds": time.perf_counter() - began,
               "aligner": str(final)}
    atomic_write_json(out / "distill_summary.json", summary)
    return {**summary, "already_finished": False}
