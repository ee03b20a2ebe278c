"""What the three benchmark scripts share: importing a benchmark, reusing its measurement, formatting.

A benchmark under ``benchmarks/`` exposes ``measure(**options) -> dict`` (its CLI calls the same
function).  Its result is a measurement of a machine, so a script measures again only when no file
holds a measurement with the same options: the file the benchmark's CLI wrote before the scripts
existed (``results/NAME.json``, which records its options in its own fields) or the script's own
(``results/NAME/NAME.json``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from common import REPO, Experiment, config_differences

BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str):
    """The module ``benchmarks/NAME.py``, imported as ``benchmarks.NAME`` (a name that a spawned
    worker process can import again; the directory itself is on the path for its ``benchlib``)."""
    for path in (str(REPO), str(BENCHMARKS)):
        if path not in sys.path:
            sys.path.append(path)
    return importlib.import_module(f"benchmarks.{name}")


def measured(exp: Experiment, name: str, options: dict, compute: Callable[[], dict],
             legacy: Callable[[dict], dict]) -> tuple[dict, Path, list[str]]:
    """The benchmark's result for ``options``, measured only when no file holds it.

    Args:
        options: the benchmark's options (the step's configuration).
        compute: runs the benchmark with ``options``.
        legacy: the options a file from before ``options`` were recorded states of itself, derived
            from its fields, with the benchmark's command-line defaults of that time for the options
            it does not record; an option still missing counts as different (the file is not reused).

    Returns:
        ``(result, its path, options the reused file does not record)``.
    """
    def stated(data: dict) -> dict:
        return data.get("step_config") or data.get("options") or legacy(data)

    def recorded(data: dict) -> dict:  # an option the file does not state counts as different
        return stated(data)

    candidates = [exp.path(f"{name}.json"), exp.results / f"{name}.json"]
    path = next((p for p in candidates if p.is_file()
                 and not config_differences(options, recorded(json.loads(p.read_text())))), candidates[-1])
    with contextlib.chdir(REPO):  # relative model paths in the options are the repository's
        data = exp.step(path, options, compute, recorded)
    return data, path, [k for k in options if k not in stated(data)]


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    """``met`` / ``missed`` against a target, ``not measured`` without a value."""
    if value is None:
        return "not measured"
    return "met" if (value >= target if higher_is_better else value <= target) else "missed"


def fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    """A number for a table cell (thousands separated), ``n/a`` for None."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def measurement_notes(data: dict, path: Path, exp: Experiment, unrecorded: list[str], threads: Any) -> str:
    """Where a measurement comes from: its date and machine, torch threads, and unrecorded options."""
    origin = exp.origin(data, path)
    peaks = data.get("matmul_peak_gflops") or data.get("matmul_gflops") or {}
    text = (f"Measured {origin['date']}; machine: {origin['machine']}; torch threads {threads}; matmul peak in that run "
            + " / ".join(f"{k} {v:.1f}" for k, v in peaks.items()) + " GFLOP/s")
    if {"fp32", "bf16"} <= set(peaks):
        text += (" (bf16 faster than fp32: a CPU or GPU with bf16 units)." if peaks["bf16"] > peaks["fp32"]
                 else " (bf16 slower than fp32: emulated, no bf16 units).")
    else:
        text += "."
    if unrecorded:
        text += (f"  The reused file does not record the option(s) {', '.join(unrecorded)}; they were not "
                 "compared (every option it records equals this command's).")
    return text
