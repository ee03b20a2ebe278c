"""The evaluation step every experiment script shares: one ``amendlm eval`` result, reused when its recorded
configuration matches (:func:`run_eval`), and the pieces of that comparison.  Re-exported by ``common.py``.

Also how the scripts read the records of the trainings they evaluate: :func:`training_record` (an
``unlearn_config.json``) and :func:`training_seconds` / :func:`seconds_cell` (a summary's training seconds,
marked as a lower bound when the summary holds only part of a resumed run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # common.py imports this module
    from common import Experiment

_EVAL_IGNORED = ("progress", "dtype_auto")  # do not change a number


def resolved_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` decided for this machine (``bf16`` or ``fp32``); other names unchanged."""
    import torch

    from amendlm.modeling import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype(dtype, torch.device(device)))


def eval_expected(model: str, adapter: str | Path | None, config, aligner=None) -> dict:
    """The configuration that defines one ``amendlm eval`` result (dtype resolved on this machine); ``aligner``:
    the :class:`amendlm.product.AlignerConfig` of a scored pair (its resolved path and both temperatures)."""
    from dataclasses import asdict

    from amendlm.ram.api import aligner_path  # unchecked: a recorded row is compared before its aligner is made

    fields = {k: v for k, v in asdict(config).items() if k not in _EVAL_IGNORED}
    fields["dtype"] = resolved_dtype(config.dtype)
    pair = None if aligner is None else {"aligner": aligner_path(aligner.aligner), "proposal_temperature":
                                         aligner.proposal_temperature, "aligner_temperature": aligner.aligner_temperature}
    return {"model": model, "adapter": str(adapter) if adapter else None, "aligner": pair, **fields}


def eval_recorded(data: dict) -> dict:
    """The configuration an eval JSON (from ``amendlm eval`` or :func:`run_eval`) records of itself, with the
    ``upstream.*`` entries a script stamped (what made the evaluated weights)."""
    record = data.get("aligner") or None
    pair = record and {k: record.get(k) for k in ("aligner", "proposal_temperature", "aligner_temperature")}
    upstream = {k: v for k, v in (data.get("step_config") or {}).items() if k.startswith("upstream.")}
    return {"model": data.get("model"), "adapter": data.get("adapter"), "aligner": pair, **data.get("config", {}), **upstream}


def run_eval(exp: Experiment, path: Path, model: str, adapter: str | Path | None = None, aligner=None,
             upstream: dict | None = None, **options) -> dict:
    """One evaluation as a resumable step: :func:`amendlm.bias.evaluate.evaluate_model` with
    ``EvalConfig(**options)`` (and the pair with ``aligner``, an :class:`amendlm.product.AlignerConfig`),
    reused when ``path`` records the same configuration, the same aligner and temperatures, and the same
    ``upstream`` (e.g. the configuration of the training that made the aligner, stored as ``upstream.*``)."""
    from dataclasses import replace

    from amendlm.bias.evaluate import EvalConfig, evaluate_model

    config = EvalConfig(**{"progress": False, **options})
    expected = {**eval_expected(model, adapter, config, aligner), **{f"upstream.{k}": v for k, v in (upstream or {}).items()}}
    # evaluate with the resolved dtype, so that the JSON and the expectation agree
    return exp.step(path, expected, lambda: evaluate_model(model, replace(config, dtype=expected["dtype"]), adapter=adapter,
                                                          aligner=aligner),
                    recorded=eval_recorded, defaults=eval_defaults())


def eval_defaults() -> dict:
    """Values of :class:`EvalConfig` fields an older eval JSON does not record: the value each had
    when it was added (a frozen record, not today's defaults, which may change); and ``aligner``
    None: every eval made before pairs were scored is a single model's."""
    return {**EVAL_FIELDS_ADDED, "aligner": None}


# EvalConfig fields and the value each had when it was added; every eval JSON in results/ was written
# after all fields that exist today (2026-12-01), so this is empty until a field is added
EVAL_FIELDS_ADDED: dict[str, Any] = {}


# ---------------------------------------------------------------------------- unlearning records
def prefixed(prefix: str, config: dict) -> dict:
    """``{"prefix.key": value}``, so that a step's differences name the key that differs."""
    return {f"{prefix}.{k}": v for k, v in config.items()}


def training_record(config: dict) -> dict:
    """An ``unlearn_config.json`` as compared with ``UnlearnConfig.to_dict()`` (``{}`` stays ``{}``: no record).

    * ``dtype_auto`` (whether ``auto`` chose the recorded, resolved dtype) is left out: it changes
      no number, and the scripts pass the resolved dtype.
    * A field the record lacks was added to ``UnlearnConfig`` after the record was written; it
      counts as the value it had when it was added (``amendlm.unlearn.config.FIELDS_ADDED``, the
      convention of the trainer's resume check), not as whatever its default is today.
    * A former recipe name counts as the current one (``default`` -> ``biasunlearn``).
    """
    from amendlm.unlearn.config import with_added_fields

    record = {k: v for k, v in config.items() if k != "dtype_auto"}
    return with_added_fields(record) if record else record


def current_recipe_name(step_config: dict) -> dict:
    """A step's recorded configuration with ``training.recipe`` under its current name (``default``, the
    former name of ``biasunlearn``, recorded before the rename: the same run, reused)."""
    from amendlm.unlearn.recipes import RECIPE_ALIASES

    recipe = step_config.get("training.recipe")
    return {**step_config, "training.recipe": RECIPE_ALIASES[recipe]} if recipe in RECIPE_ALIASES else step_config


# ---------------------------------------------------------------------------- training seconds
def log_shows_resume(log: list[dict], seconds: float, per_step: bool) -> bool:
    """Whether a run's log proves that the run was resumed (for summaries without ``seconds_complete``).

    Args:
        log: the records of the run's log.
        seconds: the summary's ``seconds`` (in an old summary, those of the last invocation alone).
        per_step: how the log's ``seconds`` count.  False: ``align train``'s ``train_log.jsonl``, whose
            records (but ``event: val``, which time one evaluation) hold the seconds since training began,
            restarted at 0 in every resumed part before checkpoints recorded seconds: a resume shows as
            seconds going backwards.  True: ``debias``'s ``log.jsonl``, whose step records (without
            ``event``) hold the seconds of that one step; the log keeps the steps of earlier parts, so
            steps adding up to more than the last invocation's ``seconds`` show a resume.

    Returns:
        True when the log shows a resume; False when it does not (the run may still have been resumed,
        e.g. with too short a first part to tell).
    """
    if per_step:
        return sum(r["seconds"] for r in log if "event" not in r and "seconds" in r) > seconds
    running = [r["seconds"] for r in log if r.get("event") != "val" and "seconds" in r]
    return any(later < earlier for earlier, later in zip(running, running[1:]))


def training_seconds(summary: dict, log: list[dict] | None = None, per_step: bool = False) -> tuple[float | None, bool]:
    """A training summary's wall-clock training seconds and whether they are only a lower bound.

    Summaries of ``align train`` (``train_summary.json``) and ``debias`` (``summary.json``) written since
    checkpoints record seconds hold ``seconds`` (the whole run, summed over its resumed parts),
    ``seconds_this_run`` and ``seconds_complete``: False when a part resumed from a checkpoint that predates
    the field (its earlier parts count 0), so ``seconds`` is a lower bound.  Older summaries lack
    ``seconds_complete`` and hold the last invocation's seconds only: a lower bound when that invocation was
    a resume, which only the run's ``log`` can tell (:func:`log_shows_resume`, ``per_step`` as there);
    without a log, or when the log shows no resume, the seconds count as the whole run's (the logs of the
    runs recorded under ``results/`` when this was written, 2026-12-01, show none).

    Returns:
        ``(seconds, lower_bound)``; ``(None, False)`` when the summary records no seconds.
    """
    seconds = summary.get("seconds")
    if seconds is None:
        return None, False
    if "seconds_complete" in summary:
        return seconds, not summary["seconds_complete"]
    return seconds, bool(log) and log_shows_resume(log, seconds, per_step)


def seconds_cell(seconds: float | None, lower_bound: bool = False) -> str | None:
    """:func:`training_seconds`' pair for a table: ``"812"``, ``"≥ 812"`` (a lower bound), None without seconds."""
    if seconds is None:
        return None
    return f"≥ {seconds:.0f}" if lower_bound else f"{seconds:.0f}"
