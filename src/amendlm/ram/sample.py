"""Offline proposal samples ``y' ~ P_M(.|x)`` for RAM's training objective, resumable.

Every training prompt gets one sample, drawn once with the public code's settings (temperature 0.5,
top-p 0.95, top-k 10, repetition penalty 1.05).  Samples are appended to a jsonl file one batch at a
time (flushed and fsync'ed), one line per prompt::

    {"id": "...", "sample": "text", "sample_ids": [...], "finish_reason": "eos|stop|length"}

A rerun reads the ids already in the file and samples only the others, so a killed run resumes
where it stopped.  A half-written last line (killed mid-write) is ignored and re-sampled.  The
configuration is written beside it (``<out>.config.json``) before sampling starts, and again with a
summary of the run at its end; a rerun with a different configuration (other than ``limit``,
``batch_size``, ``seed``, ``dtype`` and ``device``) is refused rather than mixing two kinds of samples
in one file.  ``align train`` reads it to check that the samples were drawn for its prompts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from amendlm.modeling import dtype_name, dtype_record, pad_token_id, resolve_dtype
from amendlm.ram.data import TASKS, TaskConfig, encode_prompt, load_task
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
        stop: strings that end a sample (cut before them); ``None`` = the task's (``xsum-sample``: a
            newline, as summaries are one sentence; a data file: none).
        batch_size: prompts per decoding batch. 8.
        seed: one ``torch.Generator`` seeded with ``seed + (number of samples already in the file)``
            draws every batch of a run, so an uninterrupted run is reproducible for a fixed batch size;
            a resumed run draws other numbers than an uninterrupted one would have.
        dtype, device: ``auto`` (default: bf16 autocast where the device does bf16 natively fast, else
            fp32), ``fp32`` or ``bf16``; resolved once for the proposal's device, ``<out>.config.json``
            records the resolved dtype and ``dtype_auto``.

    Raises:
        ValueError: an invalid sampling or loop parameter (e.g. ``max_new_tokens`` < 1).
    """

    proposal: str
    out: str
    task: TaskConfig = field(default_factory=TaskConfig)
    temperature: float = 0.5
    top_p: float = 0.95
    top_k: int = 10
    repetition_penalty: float = 1.05
    max_new_tokens: int = 64
    stop: tuple[str, ...] | None = None
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.stop is not None:
            self.stop = tuple(s for s in self.stop if s)  # ("",) = no stop string
        self.decode_config()
        self.generate_config(self.seed)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings in use: ``stop``, or the task's when it is ``None``."""
        return self.task.stop if self.stop is None else self.stop

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(mode="proposal", proposal_temperature=self.temperature, proposal_top_p=self.top_p,
                            proposal_top_k=self.top_k, repetition_penalty=self.repetition_penalty)

    def generate_config(self, seed: int) -> GenerateConfig:
        return GenerateConfig(max_new_tokens=self.max_new_tokens, greedy=False, seed=seed, stop=self.stop_strings,
                              batch_size=self.batch_size, dtype=self.dtype)


# SampleConfig fields that may change between runs appending to one file (they do not change what a sample is)
MAY_CHANGE = ("out", "limit", "batch_size", "seed", "dtype", "device")


def check_inputs(config: SampleConfig, check_model: bool = True) -> None:
    """Every check that needs no model, run before any model loads: the proposal's name (``check_model``),
    the data rows, and that an existing samples file was drawn with the same configuration.

    Raises:
        FileNotFoundError, amendlm.data.io.DataError: a bad model name or data (names file, row, field).
        ValueError: ``out`` is a file that holds no samples (names its first bad line); ``<out>.config.json``
            records another configuration (names the fields).
    """
    from amendlm.ram.api import check_model_name
    from amendlm.ram.data import task_rows
    from amendlm.ram.run_dir import config_differences

    if check_model:
        check_model_name(config.proposal, "--proposal")
    task_rows(config.task)
    out = Path(config.out)
    try:
        read_samples(out)  # an existing file is appended to: it must be samples (a truncated last line is resumed)
    except ValueError as err:
        raise ValueError(f"--out {err}: not a samples file of 'align sample' to resume; give a new .jsonl path") from None
    beside = out.with_name(out.name + ".config.json")
    if not (out.is_file() and beside.is_file()):
        return
    recorded = json.loads(beside.read_text()).get("config") or {}
    current = {**asdict(config), "stop": list(config.stop_strings)}
    if recorded.get("stop") is None:  # written before the stop strings were recorded: the task's
        preset = TASKS.get((recorded.get("task") or {}).get("data"))
        recorded = {**recorded, "stop": list(preset.stop) if preset else []}
    differs = config_differences({k: v for k, v in current.items() if k not in MAY_CHANGE},
                                 {k: v for k, v in recorded.items() if k not in MAY_CHANGE})
    differs = [d for d in differs if d.split(".")[-1] not in MAY_CHANGE]
    if differs:
        raise ValueError(f"{out} holds samples drawn with another configuration ({', '.join(differs)}; see {beside}); "
                         "use a new --out or the same options")


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


def sample_proposal(config: SampleConfig, model=None, tokenizer=None, progress: bool = False) -> dict:
    """Append one proposal sample per not-yet-sampled prompt to ``config.out``.

    Args:
        model, tokenizer: an already loaded proposal (tests); loaded from ``config.proposal`` otherwise.
        progress: show a progress bar (tqdm, on stderr) over the prompts to sample.

    Returns:
        a summary dict: prompts in the split, already done, newly sampled, seconds, tokens/s.

    Raises:
        see :func:`check_inputs` (raised before the model loads).
    """
    from tqdm.auto import tqdm

    check_inputs(config, check_model=model is None)
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
    record = {**asdict(config), "stop": list(config.stop_strings), **dtype_record(requested, dtype),
              "decode": config.decode_config().to_dict()}
    beside = out.with_name(out.name + ".config.json")
    atomic_write_json(beside, {"prompts": len(records), "already_done": len(records) - len(todo), "sampled": None,
                               "complete": False, "config": record})
    bar = tqdm(total=len(todo), desc="align sample", unit="prompt", disable=not progress)

    with open(out, "a", encoding="utf-8") as handle:
        def write(indices, generations):
            for index, generation in zip(indices, generations):
                row = {"id": todo[index].id, "sample": generation.text, "sample_ids": generation.token_ids,
                       "finish_reason": generation.finish_reason}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(indices))

        if todo:
            generate(model, None, prompts, config.decode_config(), config.generate_config(config.seed + len(done)),
                     vocab_size=len(tokenizer), pad_token_id=pad, eos_token_ids=[tokenizer.eos_token_id],
                     tokenizer=tokenizer, on_batch=write, stats=stats)
    bar.close()
    summary = {
        "prompts": len(records), "already_done": len(records) - len(todo), "sampled": len(todo), "complete": True,
        "seconds": stats.seconds, "new_tokens": stats.new_tokens,
        "tokens_per_second": stats.new_tokens / stats.seconds if stats.seconds else None,
        "finish_reasons": {r: sum(1 for s in read_samples(out).values() if s.get("finish_reason") == r)
                           for r in ("eos", "stop", "length")},
        "config": record,
    }
    atomic_write_json(beside, summary)
    return summary
