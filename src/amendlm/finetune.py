"""Make a *variant* of a causal LM by briefly fine-tuning all its weights on general text.

Used by the BiasUnlearn transfer experiment: an adapter trained on the original model is
applied to a variant that drifted a little from it.  The variant is trained with the standard
causal-LM loss (mean next-token cross-entropy, natural log, over every position of fixed-length
chunks) by :class:`transformers.Trainer`, and saved as a plain merged safetensors model that
``amendlm eval --model OUT`` and ``amendlm debias --model OUT`` load like any other.

Layout of ``out/``::

    config.json, generation_config.json, model.safetensors   the fine-tuned model (fp32)
    tokenizer files                                          the base model's tokenizer, unchanged
    finetune_config.json                                     the FinetuneConfig
    summary.json                                             final / mean loss, steps, batch, data sizes, log
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from amendlm.data.io import DataError, read_lines
from amendlm.data.text import load_texts
from amendlm.report import atomic_directory, package_versions
from amendlm.resources import DEFAULT_MODEL, file_sha256, resolve_dataset

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Options of one variant fine-tuning run.

    Attributes:
        out: output directory; must not exist or be empty.
        model: embedded name, local directory or hub id of the base model.
        texts: embedded dataset name (default ``xsum-sample``: not the WikiText sample on which
            perplexity is reported) or a local ``.jsonl``/``.json``/``.csv`` (one text per row in
            ``text_field``) or ``.txt`` (one text per non-blank line) file.
        text_field: the field holding the text (ignored for ``.txt``).
        limit: use the first N non-empty texts (``None``: all).
        chunk_tokens: length of a training sequence in tokens.  Texts are tokenized without
            special tokens, each followed by EOS, concatenated and cut into chunks of this length
            (the remainder shorter than one chunk is dropped).
        max_steps: optimizer steps (the data is cycled if it holds fewer than ``max_steps`` times
            the global batch).  60 steps of 8 x 128 tokens on one device is ~61k tokens.
        batch_size: chunks per device per optimizer step (the Trainer's
            ``per_device_train_batch_size``); the global batch is ``batch_size`` times the number
            of devices, and is recorded in ``summary.json`` as ``sequences_per_step``.
        lr: peak AdamW learning rate, decayed linearly to 0 over ``max_steps``.
        seed: seed of the Trainer (data order, dropout).
        dtype: ``fp32`` or ``bf16`` autocast (weights and the saved model stay fp32), or ``auto``
            (resolved by :func:`training_dtype`; ``summary.json`` records the dtype used);
            validated by :func:`amendlm.modeling.parse_dtype`.
        cpu: use the CPU even when an accelerator is present.
    """

    out: str
    model: str = DEFAULT_MODEL
    texts: str = "xsum-sample"
    text_field: str = "document"
    limit: int | None = None
    chunk_tokens: int = 128
    max_steps: int = 60
    batch_size: int = 8
    lr: float = 5e-5
    seed: int = 0
    dtype: str = "fp32"
    cpu: bool = False

    def __post_init__(self) -> None:
        from amendlm.modeling import parse_dtype  # torch is imported lazily: `amendlm --help` stays fast

        parse_dtype(self.dtype)
        for name in ("chunk_tokens", "max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all texts), got {self.limit}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


def read_texts(source: str | Path, field: str = "document", limit: int | None = None) -> tuple[Path, list[str]]:
    """The non-empty texts of ``source`` (blank ones are skipped), first ``limit`` of them.

    Returns:
        ``(path, texts)``: the resolved file and its texts.

    Raises:
        FileNotFoundError: neither an embedded dataset nor an existing file.
        DataError: a row lacks ``field`` or holds a non-string (names the file, row and field);
            the file is not UTF-8 (names the file and line); no non-empty text at all.
    """
    path = resolve_dataset(source)
    if path.suffix.lower() == ".txt":
        texts = read_lines(path)  # one text per non-blank line; `field` does not apply
    else:
        texts = load_texts(path, field=field)
        if not texts:
            raise DataError(f"{path}: no non-empty text in field '{field}'")
    return path, texts[:limit] if limit is not None else texts


def chunk_token_ids(texts: list[str], tokenizer, chunk_tokens: int) -> list[list[int]]:
    """Tokenize ``texts`` (no special tokens, EOS after each), concatenate, cut into equal chunks.

    Returns:
        ``n_chunks`` lists of exactly ``chunk_tokens`` ids; the final partial chunk is dropped.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate texts")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return [stream[start:start + chunk_tokens] for start in range(0, len(stream) - chunk_tokens + 1, chunk_tokens)]


def language_modeling_collator(tokenizer):
    """The causal-LM collator: ``labels`` = ``input_ids`` with every pad-token position set to -100.

    The model shifts the labels itself, so position ``t`` is trained to predict ``labels[t]``
    from ``input_ids[:t]``.  A tokenizer without a pad token gets its EOS as pad token (in
    place): the chunks are equal-length so nothing is ever padded, but the EOS separators
    between texts then get label -100 and are not trained on.  With a distinct pad token
    the EOS separators are trained on.
    """
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)


def training_dtype(name: str, cpu: bool = False) -> torch.dtype:
    """The Trainer's autocast dtype for ``name``: float32 (no autocast) or bfloat16.

    Resolved by :func:`amendlm.modeling.resolve_dtype` (``"auto"`` for the device the Trainer
    will use: the CPU when ``cpu`` or without CUDA).

    Raises:
        ValueError: an unknown name, or a dtype other than float32 / bfloat16.
    """
    import torch

    from amendlm.modeling import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")  # as use_cpu below
    dtype = resolve_dtype(name, device)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"finetune trains in float32 or bfloat16 autocast; dtype '{name}' gives {dtype}")
    return dtype


def finetune_variant(config: FinetuneConfig) -> Path:
    """Fine-tune every weight of ``config.model`` on general text and save the variant in ``config.out``.

    The data is checked before the model is loaded.  Training uses :class:`transformers.Trainer`
    with :func:`language_modeling_collator` (labels are the inputs, shifted inside the model;
    when the tokenizer's pad token is, or falls back to, its EOS, the EOS separators between
    texts get label -100 and are not trained on).  Nothing is checkpointed mid-run.  ``out``
    is written through a staging directory renamed into place at the end, so an interrupted
    or failed run leaves no ``out`` behind.

    Returns:
        ``Path(config.out)``.

    Raises:
        FileExistsError: ``out`` is an existing file, or a directory that is not empty.
        FileNotFoundError / DataError: see :func:`read_texts`.
        ValueError: the texts give fewer tokens than one chunk; ``chunk_tokens`` exceeds the
            model's ``max_position_embeddings``; the tokenizer has no EOS token; see
            :func:`training_dtype`.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    from amendlm.modeling import dtype_record, load_model

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is an existing file, not a directory; choose a new --out")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    texts_path, texts = read_texts(config.texts, field=config.text_field, limit=config.limit)
    dtype = training_dtype(config.dtype, cpu=config.cpu)
    began = time.perf_counter()
    model, tokenizer = load_model(config.model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.chunk_tokens > max_positions:
        raise ValueError(f"chunk_tokens {config.chunk_tokens} exceeds the model's max_position_embeddings {max_positions}")
    chunks = chunk_token_ids(texts, tokenizer, config.chunk_tokens)
    if not chunks:
        raise ValueError(f"{texts_path}: {len(texts)} texts give fewer than chunk_tokens={config.chunk_tokens} tokens")
    logger.info("fine-tuning on %d chunks of %d tokens from %d texts", len(chunks), config.chunk_tokens, len(texts))

    with atomic_directory(out) as staging, tempfile.TemporaryDirectory(prefix="trainer.", dir=staging) as scratch:
        tokenizer.save_pretrained(str(staging))  # saved as loaded, before the collator's pad-token fallback
        collator = language_modeling_collator(tokenizer)
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            lr_scheduler_type="linear",
            seed=config.seed,
            bf16=dtype == torch.bfloat16,  # autocast; weights stay fp32
            use_cpu=config.cpu or not torch.cuda.is_available(),  # else Trainer refuses bf16 on a CPU-only machine
            save_strategy="no",
            report_to="none",
            logging_steps=max(1, config.max_steps // 10),  # ~10 loss lines under the progress bar
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=[{"input_ids": ids} for ids in chunks],
        )
        result = trainer.train()
        model.save_pretrained(str(staging), safe_serialization=True)
        losses = [record for record in trainer.state.log_history if "loss" in record]
        sequences_per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        (staging / "finetune_config.json").write_text(json.dumps({**config.to_dict(), **dtype_record(config.dtype, dtype)}, indent=2) + "\n")
        summary = {
            "final_loss": losses[-1]["loss"] if losses else None,  # mean CE over the last logging window
            "mean_loss": result.training_loss,  # mean CE over all steps
            "steps": result.global_step,
            "texts": len(texts),
            "chunks": len(chunks),
            "sequences_per_step": sequences_per_step,  # global batch over all devices
            "tokens_per_step": sequences_per_step * config.chunk_tokens,
            **dtype_record(config.dtype, dtype),  # resolved "bf16"/"fp32" and whether auto chose it
            "texts_path": str(texts_path),
            "texts_sha256": file_sha256(texts_path),
            "seconds": time.perf_counter() - began,
            "log": losses,
            "versions": package_versions(),
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return out


# ---- the `amendlm finetune` command (registered on the main app by amendlm.cli) ----


def finetune_command(
    out: Path = typer.Option(..., help="Output directory for the variant (must not exist or be empty)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, local directory, local .gguf file or Hugging Face id."),
    texts: str = typer.Option("xsum-sample", help="Embedded dataset name or a local jsonl/json/csv/txt file."),
    text_field: str = typer.Option("document", help="Field holding the text (jsonl/json/csv)."),
    limit: Optional[int] = typer.Option(None, help="Use the first N non-empty texts."),
    chunk_tokens: int = typer.Option(128, help="Tokens per training sequence."),
    max_steps: int = typer.Option(60, help="Optimizer steps."),
    batch_size: int = typer.Option(8, help="Sequences per device per step."),
    lr: float = typer.Option(5e-5, help="Peak AdamW learning rate (linear decay to 0)."),
    seed: int = typer.Option(0, help="Training seed (data order)."),
    dtype: str = typer.Option("auto", help="fp32, bf16 autocast (fast only with bf16 hardware) or auto (bf16 where the device does it natively fast, else fp32; summary.json records which)."),
    cpu: bool = typer.Option(False, help="Use the CPU even if an accelerator is present."),
) -> None:
    """Make a variant of a causal LM by fine-tuning all its weights briefly on general text."""
    from amendlm.errors import check_out_directory, user_errors

    try:
        config = FinetuneConfig(
            out=str(out), model=model, texts=texts, text_field=text_field, limit=limit, chunk_tokens=chunk_tokens,
            max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, dtype=dtype, cpu=cpu,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    with user_errors():
        check_out_directory(out)  # an existing file, or a path under one: one line before the texts and the model load
        path = finetune_variant(config)
    summary = json.loads((path / "summary.json").read_text())
    final = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    typer.echo(f"variant written to {path} ({summary['steps']} steps, final loss {final}, "
               f"mean loss {summary['mean_loss']:.4f})")


def register(app: typer.Typer) -> None:
    """Add ``finetune`` to the ``amendlm`` app."""
    app.command("finetune")(finetune_command)
