"""RAM tasks: canonical prompt/response records, an explicit train/test split, prompt encoding.

A task turns rows of a file into :class:`AlignRecord` s (``id``, ``prompt`` text, ``response`` text):

* ``xsum-sample`` (embedded, 1,000 BBC articles): prompt = an instruction + the document cut to
  ``max_document_tokens`` tokens, response = the reference one-sentence summary;
* any local jsonl/json/csv with ``prompt`` and ``response`` fields (names configurable).

The split is deterministic and independent of row order: rows are ranked by
``sha256(f"{split_seed}:{id}")`` and the first ``n_test`` form ``test`` (200 of 1,000 for XSum),
the rest ``train``.  Training and sampling use ``train``; ``align eval`` reports ``test``, and decides on
``val``: the share of ``train`` that ``align train`` held out (:mod:`amendlm.ram.validation`).

Prompts are encoded with the tokenizer's chat template when it has one (user turn + generation
prompt), else as ``[start] + tokens(prompt)``; a response is ``tokens(response) + [EOS]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from amendlm.data.io import DataError, read_rows
from amendlm.data.text import load_prompt_response
from amendlm.modeling import start_token_id
from amendlm.resources import resolve_dataset

SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class AlignRecord:
    """One prompt/response example; ``prompt`` is the user message before any chat template."""

    id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class TaskPreset:
    """Field names and instruction of a registered task."""

    prompt_field: str
    response_field: str
    instruction: str  # formatted with {prompt}
    n_test: int
    stop: tuple[str, ...]


TASKS: dict[str, TaskPreset] = {
    "xsum-sample": TaskPreset(
        prompt_field="document",
        response_field="summary",
        instruction="Summarize the following BBC article in one sentence.\n\nArticle: {prompt}",
        n_test=200,
        stop=("\n",),
    ),
}


@dataclass
class TaskConfig:
    """Where the records come from and how prompts are built.

    Attributes:
        data: a registered task (``xsum-sample``) or a local jsonl/json/csv file.
        split: ``train``, ``test`` or ``all``.
        n_test: size of the test split; ``None`` = the task's (200 for XSum, 10% of a file otherwise).
        split_seed: seed of the hash split. 0.
        max_document_tokens: the prompt field is cut to this many tokens before the instruction is
            added (XSum documents average ~370 words). 128, the budget of every ``align`` command
            and of ``experiments/ram_xsum.py``; 0 = no cut.
        chat_template: ``None`` = use it when the tokenizer has one; True / False to force.
        limit: keep only the first N records of the split (in split order); ``None`` = all.
    """

    data: str = "xsum-sample"
    split: str = "train"
    n_test: int | None = None
    split_seed: int = 0
    max_document_tokens: int = 128
    chat_template: bool | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.max_document_tokens < 0:
            raise ValueError(f"max_document_tokens must be >= 0, got {self.max_document_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    @property
    def preset(self) -> TaskPreset | None:
        return TASKS.get(self.data)

    @property
    def stop(self) -> tuple[str, ...]:
        """Default stop strings of the task (``("\\n",)`` for one-sentence XSum summaries)."""
        return self.preset.stop if self.preset else ()

    def to_dict(self) -> dict:
        return asdict(self)


def split_ids(ids: list[str], n_test: int, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic split: ids ranked by ``sha256(f"{seed}:{id}")``; the first ``n_test`` are ``test``.

    Raises:
        ValueError: duplicate ids, or ``n_test`` not in ``[1, len(ids) - 1]``.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("record ids must be unique to split them")
    if not 1 <= n_test < len(ids):
        raise ValueError(f"n_test must be between 1 and {len(ids) - 1}, got {n_test}")
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return {"test": ranked[:n_test], "train": ranked[n_test:]}


def cut_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (unchanged if shorter or ``max_tokens`` is 0)."""
    if max_tokens <= 0:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).rstrip()


def task_rows(config: TaskConfig) -> list[dict]:
    """Rows ``{"id", "prompt", "response"}`` of ``config.split``, in split order, as the file holds them
    (no cut, no instruction): everything :func:`load_task` reads, checked without a tokenizer, so that a
    command can refuse bad data before it loads a model.

    Raises:
        FileNotFoundError: no such data file or registered task.
        amendlm.data.io.DataError: a row lacks a field (names file, row, field).
        ValueError: the split cannot be made (duplicate ids, too few rows).
    """
    preset = config.preset
    if preset is not None:
        rows = _preset_rows(config.data, preset)
    else:
        rows = load_prompt_response(config.data, "prompt", "response")
    by_id = {row["id"]: row for row in rows}
    if config.split == "all":
        chosen = [row["id"] for row in rows]
    else:
        n_test = config.n_test or (preset.n_test if preset else max(1, len(rows) // 10))
        chosen = split_ids([row["id"] for row in rows], n_test, config.split_seed)[config.split]
    chosen = [i for i in chosen if by_id[i]["prompt"].strip() and by_id[i]["response"].strip()]
    if config.limit is not None:
        chosen = chosen[: config.limit]
    return [by_id[i] for i in chosen]


def load_task(config: TaskConfig, tokenizer, rows: list[dict] | None = None) -> list[AlignRecord]:
    """Records of ``config.split``, in split order, documents cut and instruction applied.

    Args:
        rows: the rows to build instead of :func:`task_rows` ``(config)`` (e.g. ``align eval``'s val
            split, :func:`amendlm.ram.validation.val_rows`); cut and instruction as ``config`` says.

    Raises:
        see :func:`task_rows`.
    """
    preset = config.preset
    instruction = preset.instruction if preset else "{prompt}"
    records = []
    for row in task_rows(config) if rows is None else rows:
        document = cut_tokens(tokenizer, row["prompt"], config.max_document_tokens)
        records.append(AlignRecord(row["id"], instruction.format(prompt=document), row["response"].strip()))
    return records


def _preset_rows(name: str, preset: TaskPreset) -> list[dict]:
    """Rows of an embedded task as ``{"id", "prompt", "response"}``.  The split is made over every row
    (so it does not depend on content); rows with an empty field are then dropped (the embedded XSum
    sample has one empty document, so its splits hold 800/200 ids and 799/200 or 800/199 records).

    Raises:
        DataError: a field is missing or not text (names file, row and field).
    """
    path = resolve_dataset(name)
    rows = []
    for number, row in enumerate(read_rows(path), start=1):
        texts = {}
        for key, field_name in (("prompt", preset.prompt_field), ("response", preset.response_field)):
            value = row.get(field_name)
            if value is None:
                raise DataError(f"{path} row {number}: missing field '{field_name}'")
            if not isinstance(value, str):
                raise DataError(f"{path} row {number}: field '{field_name}' must be text, got {type(value).__name__}")
            texts[key] = value
        rows.append({"id": str(row.get("id", number)), **texts})
    return rows


def uses_chat_template(tokenizer, chat_template: bool | None = None) -> bool:
    """Whether prompts are wrapped in the chat template (``None``: when the tokenizer has one).

    Raises:
        ValueError: ``chat_template=True`` but the tokenizer has none.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return has if chat_template is None else chat_template


def encode_prompt(tokenizer, prompt: str, chat_template: bool | None = None) -> list[int]:
    """Token ids the model is conditioned on: the chat-templated user turn + generation prompt, or
    ``[start] + tokens(prompt)`` (start = BOS, else EOS) without a template."""
    if uses_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return [start_token_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def encode_response(tokenizer, response: str) -> list[int]:
    """``tokens(response) + [EOS]``: the tokens a response contributes to the loss.

    Raises:
        ValueError: the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
