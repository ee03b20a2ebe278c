"""The directory of an ``align train`` run: what it holds, and the checks that keep reruns honest.

Files in ``OUT``: ``train_config.json`` (the configuration, resolved dtype, sizes), ``train_log.jsonl``
(``event: train`` records every ``log_every`` steps, ``event: heldout`` records of the held-out loss, whose
``seconds`` are the training seconds of the run so far, summed over its resumed parts: in runs logged before
checkpoints recorded seconds, each part's count restarted at 0; with ``--pairs``, ``event: val`` records
whose ``seconds`` are that one evaluation's; ``debias``'s ``log.jsonl`` records one step's seconds instead),
``checkpoints/step-N`` (the newest only; the last one is written at the final step; its
``trainer_state.json`` holds the step, the micro-batches done and the training ``seconds`` so far),
``aligner/`` (the trained model) and ``train_summary.json`` (written last: the run is finished).

* :func:`check_resume` refuses to continue a run whose configuration differs (one line naming the
  fields), as ``amendlm debias --resume`` does;
* :func:`finished_summary` lets a rerun of a finished run say so instead of training again;
* :func:`truncate_log` drops log records past the checkpoint a run resumes from, so no step is logged twice;
* :func:`seconds_before` reads the training seconds of the parts before a resume from its checkpoint;
* :func:`check_samples` refuses proposal samples drawn for other prompts (another document budget,
  data file or chat template) than training builds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONFIG_FILE, LOG_FILE, SUMMARY_FILE = "train_config.json", "train_log.jsonl", "train_summary.json"
# TrainConfig fields that do not change what is trained (where and how often things are written)
NOT_COMPARED = ("out", "save_every", "log_every", "device")
# TrainConfig fields added after runs were saved, with the value that reproduces those runs
FIELDS_ADDED = {"eval_fraction": 0.0, "eval_every": 0, "pairs": None, "zero_head": False}
# TaskConfig fields that decide the prompt text a sample was drawn for (samples are joined by id)
PROMPT_FIELDS = ("data", "max_document_tokens", "chat_template")


def config_differences(current: dict, saved: dict, skip: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Names of the fields of ``current`` whose value differs in ``saved``; nested dicts give dotted names
    (``task.max_document_tokens``).  A field ``saved`` lacks differs unless :data:`FIELDS_ADDED` gives it
    the same value (top level only).  Tuples equal lists (JSON round trip)."""
    current, saved = json.loads(json.dumps(current)), json.loads(json.dumps(saved))
    missing = object()
    differs = []
    for key, value in current.items():
        if key in skip:
            continue
        have = saved.get(key, FIELDS_ADDED.get(key, missing) if not prefix else missing)
        if isinstance(value, dict) and isinstance(have, dict):
            differs += config_differences(value, have, prefix=f"{prefix}{key}.")
        elif have != value:
            differs.append(f"{prefix}{key}")
    return sorted(differs)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete ``checkpoints/step-N`` (with its ``trainer_state.json``), or None."""
    done = [p for p in (Path(out) / "checkpoints").glob("step-*")
            if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, out: Path, step: int, micro: int, extra: dict | None = None) -> None:
    """Model, optimizer, scheduler and RNG state at ``step`` (after ``micro`` micro-batches), written to a
    temporary directory and renamed into place; older checkpoints are then removed.

    Every process calls this: the main one stages the directory, all write into it (accelerate
    saves the weights, optimizer and scheduler from the main process and each process's RNG
    state), then the main one renames it into place.  ``extra`` (JSON-able) is stored beside the
    step in ``trainer_state.json``."""
    import contextlib

    from amendlm.distributed import main_process_value
    from amendlm.report import atomic_directory

    root = Path(out) / "checkpoints"
    final = root / f"step-{step:06d}"
    main = accelerator.is_main_process
    with atomic_directory(final) if main else contextlib.nullcontext() as staging:
        staging = Path(main_process_value(str(staging) if main else None, accelerator))
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # all RNG files are in before the rename
        if main:
            (staging / "trainer_state.json").write_text(json.dumps({"step": step, "micro_batches": micro, **(extra or {})}))
    if main:
        for old in root.glob("step-*"):  # keep only the newest checkpoint
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def seconds_before(state: dict | None) -> tuple[float, bool]:
    """The training seconds of a run's parts before a resume, from its checkpoint's ``trainer_state.json``.

    Args:
        state: the checkpoint's trainer state (None: no checkpoint, the run starts now).

    Returns:
        ``(seconds, complete)``: wall-clock seconds the earlier parts trained (summed over every resume),
        and whether that sum is whole.  A checkpoint written before checkpoints recorded seconds gives
        ``(0.0, False)``; ``complete`` stays False for the rest of the run.
    """
    if state is None:
        return 0.0, True
    if "seconds" not in state:
        return 0.0, False
    return float(state["seconds"]), bool(state.get("seconds_complete", True))


def finished_summary(out: Path) -> dict | None:
    """The summary of a finished run (``train_summary.json`` beside a saved ``aligner/``), or None."""
    out = Path(out)
    summary = out / SUMMARY_FILE
    if summary.is_file() and (out / "aligner" / "config.json").is_file():
        return json.loads(summary.read_text())
    return None


def check_resume(config: dict, out: Path) -> None:
    """Refuse to continue (or rerun) a run in ``out`` that was configured differently.

    ``out`` "holds a run" when it has a checkpoint or a finished summary; a directory left by a run
    that died before its first checkpoint may be started afresh with any configuration.  ``dtype``
    ``auto`` matches a run that recorded ``auto``; fields in :data:`NOT_COMPARED` may change.

    Args:
        config: the new run's ``asdict(TrainConfig)``.

    Raises:
        ValueError: one line naming the differing fields and the directory.
    """
    out = Path(out)
    saved_file = out / CONFIG_FILE
    if not saved_file.is_file() or (latest_checkpoint(out) is None and not (out / SUMMARY_FILE).is_file()):
        return
    saved = json.loads(saved_file.read_text())
    skip = NOT_COMPARED + (("dtype",) if config.get("dtype") == "auto" and saved.get("dtype_auto") else ())
    differs = config_differences(config, saved, skip)
    if differs:
        raise ValueError(f"{out} holds an align train run with a different configuration ({', '.join(differs)}); "
                         f"use a new --out, or the options recorded in {saved_file}")


def resume_dtype(config_dtype: str, out: Path) -> str:
    """The dtype to train in: a run that resolved ``auto`` at its start keeps that resolution."""
    saved_file = Path(out) / CONFIG_FILE
    if config_dtype == "auto" and saved_file.is_file() and latest_checkpoint(out) is not None:
        saved = json.loads(saved_file.read_text())
        if saved.get("dtype_auto"):
            return saved["dtype"]
    return config_dtype


def truncate_log(path: Path, last_step: int | None) -> None:
    """Keep only the log records up to ``last_step`` (the checkpoint a run resumes from; None = no
    checkpoint: keep nothing, the run starts afresh, perhaps with another configuration), so a
    resumed run does not log the steps it redoes twice.  A half-written last line is dropped too."""
    from amendlm.report import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if last_step is not None and isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def check_samples(task: dict, samples: str | Path) -> None:
    """Refuse a samples file missing, or drawn for other prompts than ``task`` builds.

    Reads ``<samples>.config.json`` (written by ``align sample``); a file without it is accepted as it is.

    Args:
        task: the training ``asdict(TaskConfig)``.

    Raises:
        FileNotFoundError: no such samples file.
        ValueError: one line naming each field of :data:`PROMPT_FIELDS` that differs, with both values.
    """
    samples = Path(samples)
    if not samples.is_file():
        raise FileNotFoundError(f"{samples}: no such samples file (make it with 'amendlm align sample --out {samples}')")
    beside = samples.with_name(samples.name + ".config.json")
    if not beside.is_file():
        return
    drawn = (json.loads(beside.read_text()).get("config") or {}).get("task") or {}
    differs = [f"{name} {drawn[name]!r} vs {task.get(name)!r}" for name in PROMPT_FIELDS
               if name in drawn and json.loads(json.dumps(drawn[name])) != json.loads(json.dumps(task.get(name)))]
    if differs:
        raise ValueError(f"{samples} was drawn for other prompts than training builds ({'; '.join(differs)}: "
                         f"sampled vs training, see {beside}); pass the same options or sample again")
