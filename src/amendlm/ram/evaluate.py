"""``align eval``: ROUGE of every system on the held-out prompts (XSum ``test`` split by default).

The prompts are the task's ``test`` split (reported), or with ``val`` (:class:`amendlm.ram.validation.ValSplit`)
the prompts ``align train`` held out of the ``train`` split: the split to decide on (which RAM mode, ...).

Systems: ``proposal`` (P_M alone), ``aligner`` (Q alone), RAM in each mode (``par``, ``par-kl``,
``sir``, ``mds``) and optionally ``finetuned`` (the proposal fine-tuned directly, decoded alone with the
proposal's settings: the upper baseline).  Each system decodes the same prompts with the same seed and settings.

Metrics per system: ROUGE-1/2/L F1 x 100 (``rouge_score``, Porter stemmer, mean over prompts; the
per-prompt ROUGE-L as ``per_prompt_rougeL``, in the order of the results' ``ids``), mean summary length in words, tokens/s, why rows ended (``finish_reasons``), and what the chosen
tokens followed (``choices``, :class:`amendlm.ram.choices.ChoiceCounts`: the share of decoded token
steps where ``par-kl`` fell back to the proposal, and where the token was the aligner's / the
proposal's argmax).  ``higher_is_better`` is recorded beside them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from amendlm.modeling import dtype_name, dtype_record, pad_token_id, resolve_dtype
from amendlm.ram.data import TaskConfig, encode_prompt, load_task
from amendlm.ram.decoding import DecodeConfig, get_mode
from amendlm.ram.generate import GenerateConfig, GenerationStats, generate, shared_vocab_size
from amendlm.ram.validation import ValSplit

logger = logging.getLogger(__name__)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
HIGHER_IS_BETTER = {"rouge1": True, "rouge2": True, "rougeL": True, "mean_words": None, "tokens_per_second": True}
SYSTEMS = ("proposal", "aligner", "par", "par-kl", "sir", "sir-best", "mds", "finetuned")


@dataclass
class AlignEvalConfig:
    """Which systems to decode on which prompts.

    Attributes:
        proposal, aligner: model names/paths (the aligner is ``align train``'s ``out/aligner``).
        finetuned: the directly fine-tuned proposal (merged), for the ``finetuned`` system.
        systems: subset of :data:`SYSTEMS`; ``finetuned`` is skipped without ``finetuned``.
        task: prompts and references (``test`` split; ``train`` with ``val``).
        decode: shared rule parameters (mode is set per system).
        generate: loop parameters; greedy by default so systems differ by rule, not by luck (``sir`` and
            ``sir-best`` still draw, seeded by ``generate.seed``); ``generate.stop``: the strings that end a
            summary (the ``align eval`` command passes the task's, a newline for ``xsum-sample``).
        val: evaluate on the val split instead of ``task.split``: the prompts ``align train`` held out of
            the train split with these settings (:mod:`amendlm.ram.validation`; ``task.split`` must then be
            ``train``, ``task.limit`` cuts the val prompts).  None (default): ``task.split``.
    """

    proposal: str
    aligner: str | None
    finetuned: str | None = None
    systems: list[str] = field(default_factory=lambda: ["proposal", "aligner", "par", "par-kl", "sir", "mds"])
    task: TaskConfig = field(default_factory=lambda: TaskConfig(split="test"))
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(greedy=True, max_new_tokens=64))
    device: str = "cpu"
    val: ValSplit | None = None

    def __post_init__(self) -> None:
        if self.val is not None and self.task.split != "train":
            raise ValueError(f"val prompts come from the train split: task.split must be 'train', got {self.task.split!r}")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
        if self.aligner is None and any(s != "proposal" and s != "finetuned" for s in self.systems):
            raise ValueError("systems other than 'proposal' and 'finetuned' need an aligner")
        if "finetuned" in self.systems and self.finetuned is None:
            raise ValueError("system 'finetuned' needs --finetuned (the directly fine-tuned proposal)")

    @property
    def split(self) -> str:
        """The split evaluated: ``val``, or ``task.split``."""
        return "val" if self.val is not None else self.task.split


def rouge_per_prompt(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """ROUGE-1/2/L F1 x 100 of each prediction against its reference (``rouge_score``, Porter stemmer).

    Returns:
        ``{"rouge1": [...], "rouge2": [...], "rougeL": [...]}``, one value per prompt, in input order
        (the units of a paired bootstrap between two systems).

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            out[name].append(100.0 * scores[name].fmeasure)
    return out


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 over prompts (:func:`rouge_per_prompt`) and mean prediction length in words.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    return _means(rouge_per_prompt(predictions, references), predictions)


def _means(per_prompt: dict[str, list[float]], predictions: list[str]) -> dict[str, float]:
    result = {name: sum(values) / len(values) for name, values in per_prompt.items()}
    result["mean_words"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return result


def check_inputs(config: AlignEvalConfig) -> AlignEvalConfig:
    """Every check that needs no model, before any loads: model names (an ``align train`` run directory
    given as ``aligner`` or ``finetuned`` becomes its ``aligner/``), the data rows, and with ``val`` its
    settings against the run directory of the aligner or fine-tune evaluated, if either comes from one
    (:func:`amendlm.ram.validation.check_against_run`).

    Returns:
        ``config`` with the resolved model paths.

    Raises:
        FileNotFoundError, ValueError, amendlm.data.io.DataError: one line naming the option or file, row, field.
    """
    from amendlm.ram.api import check_model_name, resolve_aligner
    from amendlm.ram.validation import check_against_run

    check_model_name(config.proposal, "--proposal")
    config = replace(config, aligner=resolve_aligner(config.aligner),
                     finetuned=resolve_aligner(config.finetuned, "--finetuned") if "finetuned" in config.systems else config.finetuned)
    if config.val is not None:
        for run in trained_runs(config):
            check_against_run(config.task, config.val, run)
    eval_rows(config)
    return config


def trained_runs(config: AlignEvalConfig) -> list:
    """The ``align train`` run directories the evaluated aligner and fine-tune come from (none, one or two)."""
    from amendlm.ram.validation import run_of

    models = [config.aligner, config.finetuned if "finetuned" in config.systems else None]
    return [run for run in dict.fromkeys(run_of(m) for m in models) if run is not None]


def eval_rows(config: AlignEvalConfig) -> list[dict]:
    """The rows evaluated: the val split (:func:`amendlm.ram.validation.val_rows`) or ``task.split``'s.

    Raises:
        see :func:`amendlm.ram.data.task_rows` and :func:`amendlm.ram.validation.val_rows`.
    """
    from amendlm.ram.data import task_rows
    from amendlm.ram.validation import val_rows

    return val_rows(config.task, config.val) if config.val is not None else task_rows(config.task)


def evaluate_systems(config: AlignEvalConfig, generations_path: str | None = None, progress: bool = False) -> dict:
    """Decode every system on the task's prompts and score it.  Returns a results dict (data, not text).

    Args:
        generations_path: a jsonl written with one line per (system, prompt).
        progress: show a progress bar (tqdm, on stderr) over the prompts of each system.

    Raises:
        see :func:`check_inputs` (raised before any model loads).
    """
    from tqdm.auto import tqdm

    from amendlm.modeling import load_model
    from amendlm.provenance import weights_record
    from amendlm.report import atomic_write_text

    config = check_inputs(config)
    proposal, tokenizer = load_model(config.proposal, device=config.device)
    requested, dtype = config.generate.dtype, resolve_dtype(config.generate.dtype, next(proposal.parameters()).device)
    config = replace(config, generate=replace(config.generate, dtype=dtype_name(dtype)))  # "auto" decided once
    aligner = aligner_tokenizer = None
    if config.aligner is not None:
        aligner, aligner_tokenizer = load_model(config.aligner, device=config.device)
    vocab_size = shared_vocab_size(tokenizer, aligner_tokenizer or tokenizer, config.proposal, config.aligner or "-",
                                   proposal, aligner)
    records = load_task(config.task, tokenizer, rows=eval_rows(config))
    prompts = [encode_prompt(tokenizer, r.prompt, config.task.chat_template) for r in records]
    references = [r.response for r in records]
    pad = pad_token_id(tokenizer)
    results, lines = {}, []
    weights = {"proposal": weights_record(proposal), "aligner": weights_record(aligner) if aligner is not None else None}
    for system in config.systems:
        models = (proposal, aligner)
        mode = system
        if system == "finetuned":
            finetuned, finetuned_tokenizer = load_model(config.finetuned, device=config.device)
            weights["finetuned"] = weights_record(finetuned)
            shared_vocab_size(tokenizer, finetuned_tokenizer, config.proposal, config.finetuned, proposal, finetuned)
            models, mode = (finetuned, None), "proposal"  # the fine-tuned proposal, decoded as the proposal is
        get_mode(mode)
        stats = GenerationStats()
        began = time.perf_counter()
        bar = tqdm(total=len(prompts), desc=f"align eval {system}", unit="prompt", disable=not progress)
        out = generate(*models, prompts, replace(config.decode, mode=mode), config.generate, vocab_size=vocab_size,
                       pad_token_id=pad, eos_token_ids=[tokenizer.eos_token_id], tokenizer=tokenizer, stats=stats,
                       on_batch=lambda indices, generations: bar.update(len(indices)))
        bar.close()
        predictions = [g.text.strip() for g in out]
        per_prompt = rouge_per_prompt(predictions, references)
        metrics = {**_means(per_prompt, predictions), "per_prompt_rougeL": per_prompt["rougeL"]}
        metrics.update(seconds=time.perf_counter() - began, new_tokens=stats.new_tokens,
                       tokens_per_second=stats.new_tokens / stats.seconds if stats.seconds else None,
                       finish_reasons={r: sum(g.finish_reason == r for g in out) for r in ("eos", "stop", "length")},
                       choices=stats.choices.rates())
        results[system] = metrics
        logger.info("%s: ROUGE-L %.2f (%.0f s)", system, metrics["rougeL"], metrics["seconds"])
        lines += [json.dumps({"system": system, "id": r.id, "prediction": p, "reference": r.response}, ensure_ascii=False)
                  for r, p in zip(records, predictions)]
    if generations_path is not None:
        atomic_write_text(generations_path, "\n".join(lines) + "\n")
    return {"n_prompts": len(records), "ids": [r.id for r in records], "systems": results, "higher_is_better": HIGHER_IS_BETTER, "weights": weights,
            "config": {**asdict(config), "split": config.split,
                       "generate": {**asdict(config.generate), **dtype_record(requested, dtype)}}}
