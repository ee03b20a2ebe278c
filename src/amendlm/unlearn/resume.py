"""Starting, resuming and interrupting an unlearning run without losing work.

* :func:`check_run_directory` refuses to overwrite a previous run, or to resume one that has
  no checkpoint;
* :func:`check_resume_config` refuses to resume with a different configuration;
* :func:`resume_dtype` makes a resumed ``dtype="auto"`` run reuse the dtype its start chose;
* :func:`sigterm_as_interrupt` turns SIGTERM into ``KeyboardInterrupt`` while training, so both
  end in a checkpoint that ``--resume`` continues.

The files these read are described in :mod:`amendlm.unlearn.artifacts`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from dataclasses import replace
from pathlib import Path

from amendlm.unlearn import artifacts
from amendlm.unlearn.config import UnlearnConfig, with_added_fields


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt while training (main thread only), then restore."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_run_directory(out: str | Path, resume: bool) -> None:
    """Refuse to overwrite a previous run, or to resume one that cannot be resumed.

    A directory "holds a run" when it has a checkpoint (``checkpoint/`` or its ``.old`` twin) or
    saved weights (``adapter_model.safetensors`` / ``model.safetensors``).  A directory left by a
    run that died before its first checkpoint holds neither and may be started afresh.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is off (nothing is overwritten).
        FileNotFoundError: ``resume`` is on and ``out`` has no complete checkpoint.
    """
    out = Path(out)
    checkpoint = artifacts.find_checkpoint(out / "checkpoint")
    if resume:
        if checkpoint is None:
            raise FileNotFoundError(f"{out}: no checkpoint to resume; run without --resume to start afresh")
        return
    held = [p.name for p in (out / "adapter_model.safetensors", out / "model.safetensors") if p.is_file()]
    held += [checkpoint.name] if checkpoint is not None else []
    if held:
        raise FileExistsError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it "
                              "or choose a new --out")


def check_resume_config(config: UnlearnConfig, resume: bool) -> None:
    """On ``resume``, refuse a configuration that differs from the saved one (``max_steps`` may grow, and
    ``device`` / ``cpu`` may change: where the run trains, not what).

    ``dtype="auto"`` matches a saved run that was started with ``auto``.

    Raises:
        ValueError: the differing option names, e.g. ``['lr']``.
    """
    config_file = Path(config.out) / "unlearn_config.json"
    if not (resume and config_file.is_file()):
        return
    saved = with_added_fields(json.loads(config_file.read_text()))
    current = config.to_dict()
    skip = {"max_steps", "recipe_overrides", "device", "cpu"} | ({"dtype"} if config.dtype == "auto" and saved.get("dtype_auto") else set())
    differs = sorted(k for k, v in current.items() if k not in skip and saved.get(k, v) != v)
    if differs:
        raise ValueError(f"--resume with a different configuration ({differs}); use a new --out, or resume with "
                         f"--config {config_file} --resume to continue the run exactly as it was configured")


def resume_dtype(config: UnlearnConfig, resume: bool) -> UnlearnConfig:
    """On ``resume`` with ``dtype="auto"``, reuse the dtype the run resolved at its start.

    ``auto`` is decided by a timing probe (:func:`amendlm.modeling.resolve_dtype`); probing again
    could pick the other dtype and make the resumed run differ from the saved one.
    """
    config_file = Path(config.out) / "unlearn_config.json"
    if not (resume and config.dtype == "auto" and config_file.is_file()):
        return config
    saved = json.loads(config_file.read_text())
    return replace(config, dtype=saved["dtype"]) if saved.get("dtype_auto") else config
