"""The validation split of ``align eval``: the prompts ``align train`` held out of the training split.

Decisions (which RAM mode to report, a threshold) are made on these prompts, never on ``test``, the
split reported.  ``align train`` makes one example of each train-split record (:func:`amendlm.ram.data.task_rows`:
rows with an empty field dropped, then its ``--limit``) that has a non-blank proposal sample
(:func:`amendlm.ram.examples.has_sample`), and holds out ``heldout_ids(example ids, eval_fraction, seed)``
(:func:`amendlm.ram.examples.heldout_ids`).  :func:`val_rows` rebuilds that list from the same settings
(:class:`ValSplit`); :func:`check_against_run` refuses settings that disagree with an ``align train`` run
directory's ``train_config.json``, or that hold out another number of prompts than the run recorded,
before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from amendlm.ram import run_dir
from amendlm.ram.data import TaskConfig, task_rows
from amendlm.ram.examples import has_sample, heldout_ids
from amendlm.ram.sample import read_samples

FRACTION, SEED = 0.05, 0  # align train's --eval-fraction and --seed defaults


@dataclass(frozen=True)
class ValSplit:
    """Which train-split prompts form ``val``: the settings of the ``align train`` run that held them out.

    Attributes:
        fraction: its ``--eval-fraction``, the share held out; in (0, 1). 0.05.
        seed: its ``--seed``. 0.
        samples: its ``--samples`` file: prompts without a non-blank sample were never examples, so they are
            dropped before the share is drawn; None = keep every train-split prompt (right when each had one).
        train_limit: its ``--limit`` (None = every train-split prompt).
    """

    fraction: float = FRACTION
    seed: int = SEED
    samples: str | None = None
    train_limit: int | None = None

    def __post_init__(self) -> None:
        if self.fraction == 0:
            raise ValueError("--split val: a val fraction of 0 holds out no prompts (align train --eval-fraction 0 "
                             "trained on all of them); use --split test")
        if not 0 < self.fraction < 1:
            raise ValueError(f"--split val: the val fraction must be in (0, 1), got {self.fraction:g}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"--split val: train_limit must be >= 1, got {self.train_limit}")

    @classmethod
    def of_training(cls, config) -> "ValSplit":
        """The prompts an :class:`amendlm.ram.train.TrainConfig` holds out (its ``eval_fraction``, ``seed``,
        ``samples`` and ``task.limit``).

        Raises:
            ValueError: ``eval_fraction`` is 0 (nothing is held out).
        """
        return cls(config.eval_fraction, config.seed, config.samples, config.task.limit)


def heldout_rows(task: TaskConfig, val: ValSplit) -> tuple[list[dict], int]:
    """The held-out rows ``{"id", "prompt", "response"}`` in train-split order (all of them, ``task.limit`` not
    applied), and the number of prompts they were drawn from (the run's examples, held out or not).

    Args:
        task: ``data``, ``n_test`` and ``split_seed`` give the train split (``task.split`` is not read).

    Raises:
        FileNotFoundError: ``val.samples`` names no file; see :func:`amendlm.ram.data.task_rows`.
    """
    rows = task_rows(replace(task, split="train", limit=val.train_limit))
    if val.samples is not None:
        if not Path(val.samples).is_file():
            raise FileNotFoundError(f"--split val: {val.samples}: no such samples file (the run's --samples)")
        samples = read_samples(val.samples)
        rows = [row for row in rows if has_sample(samples.get(row["id"]))]
    held = heldout_ids([row["id"] for row in rows], val.fraction, val.seed)
    return [row for row in rows if row["id"] in held], len(rows)


def val_rows(task: TaskConfig, val: ValSplit) -> list[dict]:
    """The val split: :func:`heldout_rows`, the first ``task.limit`` of them.

    Raises:
        ValueError: no prompt is held out (fewer than two train prompts); see :func:`heldout_rows`.
    """
    rows, n = heldout_rows(task, val)
    if not rows:
        raise ValueError(f"--split val: {n} train prompt(s) of {task.data}: none is held out")
    return rows[: task.limit] if task.limit is not None else rows


def _same_file(a: str, b: str | None) -> bool:
    """``Path.samefile``, False when ``b`` is None or either file is missing."""
    try:
        return b is not None and Path(a).samefile(b)
    except OSError:
        return False


def run_of(model: str | None) -> Path | None:
    """The ``align train`` run directory a model comes from: ``RUN`` itself or ``RUN/aligner`` (``RUN``
    holds ``train_config.json``); None for any other model."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if (path / run_dir.CONFIG_FILE).is_file():
        return path
    if path.name == "aligner" and (path.parent / run_dir.CONFIG_FILE).is_file():
        return path.parent
    return None


def _saved(run: Path) -> dict:
    path = run / run_dir.CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if saved.get("pairs") is not None:
        raise ValueError(f"--split val: {run} was trained on preference pairs (--pairs), not on a task's prompts; "
                         "use --split test")
    return saved


def run_val(run: Path, fraction: float | None = None, seed: int | None = None) -> ValSplit:
    """``--split val``'s settings for an ``align train`` run: ``fraction`` and ``seed`` as given (None: the
    run's), its samples file (None when it is not found from here: :func:`check_against_run` then checks
    that no prompt lacked one) and its ``--limit``.

    Raises:
        ValueError: the run held out nothing (``--eval-fraction 0``), or trained on preference pairs; its
            ``train_config.json`` is not a JSON object (names the file).
    """
    saved = _saved(run)
    held = saved.get("eval_fraction", run_dir.FIELDS_ADDED["eval_fraction"])
    if fraction is None and held == 0:
        raise ValueError(f"--split val: {run} held out no prompts (trained with --eval-fraction 0); use --split test")
    samples = saved.get("samples")
    return ValSplit(fraction=held if fraction is None else fraction, seed=saved.get("seed", SEED) if seed is None else seed,
                    samples=samples if samples and Path(samples).is_file() else None,
                    train_limit=(saved.get("task") or {}).get("limit"))


def check_against_run(task: TaskConfig, val: ValSplit, run: Path) -> None:
    """Refuse val settings that would not give the prompts ``run`` held out: a val fraction, seed or train
    limit, or a data, ``split_seed`` or ``n_test`` that differ from its ``train_config.json``, or a
    number of prompts held out (and trained on) that differs from the one it recorded.  A run that recorded
    no seed used align train's default (:data:`SEED`), as :func:`run_val` assumes.

    Raises:
        ValueError: one line naming each differing setting with both values, and the file; the file is not
            a JSON object.
    """
    saved, where = _saved(run), run / run_dir.CONFIG_FILE
    theirs, ours = saved.get("task") or {}, task.to_dict()
    pairs = {"val fraction (--eval-fraction)": (val.fraction, saved.get("eval_fraction", run_dir.FIELDS_ADDED["eval_fraction"])),
             "val seed (--seed)": (val.seed, saved.get("seed", SEED)), "train limit (--limit)": (val.train_limit, theirs.get("limit")),
             **{name: (ours[name], theirs.get(name)) for name in ("data", "split", "split_seed", "n_test")}}
    differs = [f"{name} {mine!r} vs {recorded!r}" for name, (mine, recorded) in pairs.items()
               if mine != recorded and not (name == "data" and _same_file(mine, recorded))]
    if differs:
        raise ValueError(f"--split val: {'; '.join(differs)} (here vs {where}): not the prompts that run held out; "
                         "leave out --val-fraction/--val-seed to take the run's")
    if "n_heldout" not in saved:
        return
    rows, n = heldout_rows(task, val)
    if (len(rows), n) != (saved["n_heldout"], saved["n_heldout"] + saved["n_examples"]):
        raise ValueError(f"--split val: {len(rows)} of {n} train prompts held out here, {saved['n_heldout']} of "
                         f"{saved['n_heldout'] + saved['n_examples']} in {where} (samples file "
                         f"{val.samples or 'not found from here: ' + str(saved.get('samples'))}); run from the "
                         "directory align train ran in")
