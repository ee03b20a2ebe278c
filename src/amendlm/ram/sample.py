"""Offline proposal samples ``y' ~ P_M(.|x)`` for RAM's training objective, resumable.

Every training prompt gets one sample, drawn once with the public code's settings (temperature 0.5,
top-p 0.95, top-k 10, repetition penalty 1.05).  Samples are appended to a jsonl file one batch at a
time (flushed and fsync'ed), one line per prompt::

    {"id": "...", "sample": "text", "sample_ids": [...], "finish_reason": "eos|stop|length"}

A rerun reads the ids already in the file and samples only the others, so a killed run resumes
where it stopped.  A half-written last line (killed mid-write) is ignored and re-sampled.  The
configuration and a summary of the last run are written beside it (``<out>.config.json``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from amendlm.modeling import dtype_name, dtype_record, pad_token_id, resolve_dtype
from amendlm.ram.data import TaskConfig, encode_prompt, load_task
from amendlm.ram.decoding import DecodeConfig
from amendlm.ram.generate import GenerateConfig, GenerationStats, generate
from amendlm.report import atomic_write_json

logger = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """``align sample``: which proposal, which prompts, how to sample, where to append.

    Attributes:
        proposal: embedded name, local directory or hub id of ``P_M``.
        out: the samples jsonl (appended to).
        task: prompts (the ``train`` split by default).
        temperature, top_p, top_k, repetition_penalty: the public code's sampling settings.
        max_new_tokens: 64 (XSum summaries average ~21 words).
        batch_size: prompts per decoding batch. 8.
        seed: base seed; batch ``b`` of a run uses ``seed + b`` offset by the number already done.
        dtype, device: see :class:`amendlm.ram.generate.GenerateConfig` (``auto`` is resolved once for
            the proposal's device; ``<out>.config.json`` records the resolved dtype and ``dtype_auto``).
    """

    proposal: str
    out: str
    task: TaskConfig = field(default_factory=TaskConfig)
    temperature: float = 0.5
    top_p: float = 0.95
    top_k: int = 10
    repetition_penalty: float = 1.05
    max_new_tokens: int = 64
    batch_size: int = 8
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(mode="proposal", proposal_temperature=self.temperature, proposal_top_p=self.top_p,
                            proposal_top_k=self.top_k, repetition_penalty=self.repetition_penalty)

    def generate_config(self, seed: int) -> GenerateConfig:
        return GenerateConfig(max_new_tokens=self.max_new_tokens, greedy=False, seed=seed, stop=self.task.stop,
                              batch_size=self.batch_size, dtype=self.dtype)


def read_samples(path: str | Path) -> dict[str, dict]:
    """Samples by id from a jsonl written by :func:`sample_proposal` (missing file: empty; a truncated
    final line is skipped).

    Raises:
        ValueError: a complete line that is not a JSON object with an ``id`` (names file and line).
    """
    path = Path(path)
    samples: dict[str, dict] = {}
    if not path.is_file():
        return samples
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                logger.warning("%s: ignoring a truncated last line (killed mid-write)", path)
                continue
            raise ValueError(f"{path} line {number}: invalid JSON") from None
        if not isinstance(row, dict) or "id" not in row or "sample" not in row:
            raise ValueError(f"{path} line {number}: expected an object with 'id' and 'sample'")
        samples[str(row["id"])] = row
    return samples


def _truncate_partial_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def sample_proposal(config: SampleConfig, model=None, tokenizer=None) -> dict:
    """Append one proposal sample per not-yet-sampled prompt to ``config.out``.

    Args:
        model, tokenizer: an already loaded proposal (tests); loaded from ``config.proposal`` otherwise.

    Returns:
        a summary dict: prompts in the split, already done, newly sampled, seconds, tokens/s.
    """
    if model is None:
        from amendlm.modeling import load_model

        model, tokenizer = load_model(config.proposal, device=config.device)
    requested, dtype = config.dtype, resolve_dtype(config.dtype, next(model.parameters()).device)
    config = replace(config, dtype=dtype_name(dtype))  # "auto" decided once, recorded as decided
    records = load_task(config.task, tokenizer)
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _truncate_partial_line(out)
    done = read_samples(out)
    todo = [r for r in records if r.id not in done]
    logger.info("%d prompts, %d already sampled, %d to do", len(records), len(records) - len(todo), len(todo))
    prompts = [encode_prompt(tokenizer, r.prompt, config.task.chat_template) for r in todo]
    stats = GenerationStats()
    pad = pad_token_id(tokenizer)

    with open(out, "a", encoding="utf-8") as handle:
        def write(indices, generations):
            for index, generation in zip(indices, generations):
                row = {"id": todo[index].id, "sample": generation.text, "sample_ids": generation.token_ids,
                       "finish_reason": generation.finish_reason}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

        if todo:
            generate(model, None, prompts, config.decode_config(), config.generate_config(config.seed + len(done)),
                     vocab_size=len(tokenizer), pad_token_id=pad, eos_token_ids=[tokenizer.eos_token_id],
                     tokenizer=tokenizer, on_batch=write, stats=stats)
    summary = {
        "prompts": len(records), "already_done": len(records) - len(todo), "sampled": len(todo),
        "seconds": stats.seconds, "new_tokens": stats.new_tokens,
        "tokens_per_second": stats.new_tokens / stats.seconds if stats.seconds else None,
        "config": {**asdict(config), **dtype_record(requested, dtype), "decode": config.decode_config().to_dict()},
    }
    atomic_write_json(out.with_name(out.name + ".config.json"), summary)
    return summary
