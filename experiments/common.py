"""What every experiment script shares: resumable steps, provenance, tables and the results page.

An experiment script (``experiments/NAME.py``) builds one results table from the Python API:

    exp, args = Experiment.start("eval_embedded", "The embedded model, whole StereoSet dev set", argv)
    data = exp.step(exp.results / "x.json", expected={...}, compute=lambda: {...}, recorded=...)
    exp.finish(summary={...}, markdown="| a | b |\\n...", pngs=[...])

* **Resumable.** :meth:`Experiment.step` returns the JSON already at its path when the
  configuration recorded in that file equals the step's ``expected`` configuration; otherwise it
  computes it and writes it atomically, stamped with ``step_config`` and ``provenance`` (machine,
  date, command, seconds).  Files written before the scripts existed carry their configuration in
  their own fields, which ``recorded`` reads; their date is the git commit date of the file.
* **Outputs.** ``results/NAME/results.json`` (the table as data, the configuration, provenance),
  ``results/NAME/table.md``, any PNG, and ``results/NAME/section.md``; :func:`render_page` joins
  the sections of every experiment into ``docs/results.md`` (never edited by hand).
* ``--quick`` runs the same pipeline on a tiny budget into ``--results-dir`` (a temporary folder
  in the tests), so no script rots; a quick run never touches ``results/`` or ``docs/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from amendlm.report import atomic_write_json, atomic_write_text, package_versions

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
DOCS_PAGE = REPO / "docs" / "results.md"
README = REPO / "README.md"

# the order of the sections on docs/results.md (one per script; other issues add theirs here)
EXPERIMENTS = (
    "eval_embedded",
    "unlearn_methods",
    "unlearn_ablation",
    "transfer",
    "gemma3",
    "ram_xsum",
    "ram_debias",
    "bench_scoring",
    "bench_decode",
    "bench_unlearn",
    "bench_serve",
)


@functools.lru_cache(maxsize=None)
def measured_bf16_speedup() -> float:
    """:func:`amendlm.modeling.cpu_bf16_speedup`, rounded to 2 decimals, probed once per process (every
    provenance record of a run states the same measurement)."""
    from amendlm.modeling import cpu_bf16_speedup

    return round(cpu_bf16_speedup(), 2)


def machine_info() -> dict[str, Any]:
    """The machine a step ran on: CPU model and bf16/AMX flags, cores, torch threads, GPU name."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu"] = names[0] if names else platform.processor()
        info["cpu_flags"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        # what --dtype auto measures: the flags alone do not say it (a VM can list avx512_bf16 and run bf16 slower)
        info["cpu_bf16_speedup"] = measured_bf16_speedup()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def describe_machine(info: dict | None, speedups: Sequence[float] | None = None) -> str:
    """One line for the results page, e.g. ``AMD EPYC, 2 cores, avx2 (bf16 autocast matmul 0.13x fp32)``.

    The bf16 note is the measured speed-up of bf16 autocast matmuls over fp32 (the probe ``--dtype auto``
    runs, :func:`amendlm.modeling.cpu_bf16_speedup`) where the record has it; older records have only
    the CPU flags, and a flag does not prove bf16 is fast (a VM may list ``avx512_bf16`` and emulate it),
    so they say only which bf16 flag the CPU lists.  ``speedups``: several probes of this machine (one
    per record), shown as their median and range instead of the record's own value."""
    if not info:
        return "not recorded"
    flags = info.get("cpu_flags", [])
    measured = sorted(speedups) if speedups else ([info["cpu_bf16_speedup"]] if info.get("cpu_bf16_speedup") is not None else [])
    if measured:
        bf16 = f"bf16 autocast matmul {statistics.median(measured):.2f}x fp32"
        if f"{measured[0]:.2f}" != f"{measured[-1]:.2f}":  # a probe run beside a busy CPU can land far off
            bf16 += f": median of {len(measured)} probes, {measured[0]:.2f}-{measured[-1]:.2f}x"
    else:
        bf16 = "bf16 flag, speed not measured" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no bf16 flag"
    parts = [info.get("cpu") or "unknown CPU", f"{info.get('cpu_count')} cores", f"{', '.join(flags) or 'no AVX flags'} ({bf16})"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    return ", ".join(parts)


def describe_machines(infos: Sequence[dict | None]) -> list[str]:
    """The distinct machines of several records, sorted, one line each (:func:`describe_machine`): the
    records of one machine whose bf16 probes differ (timing noise) make one line with their median and range."""
    probes: dict[str, tuple[dict, list[float]]] = {}
    lines = set()
    for info in infos:
        if not info or info.get("cpu_bf16_speedup") is None:
            lines.add(describe_machine(info))
            continue
        same = {key: value for key, value in info.items() if key not in ("cpu_bf16_speedup", "torch_threads", "platform")}
        probes.setdefault(json.dumps(same, sort_keys=True), (info, []))[1].append(info["cpu_bf16_speedup"])
    lines.update(describe_machine(info, speedups) for info, speedups in probes.values())
    return sorted(lines)


def git_date(path: Path) -> str | None:
    """The commit date (YYYY-MM-DD) of the last commit that touched ``path``, or None."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=REPO,
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_json(path: Path) -> dict:
    """The JSON object at ``path``, or ``{}`` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _normalise(value: Any) -> Any:
    """JSON round trip, so tuples equal lists and numbers compare as they are stored."""
    return json.loads(json.dumps(value))


def config_differences(expected: dict, recorded: dict, defaults: dict | None = None) -> list[str]:
    """Keys of ``expected`` whose value differs in ``recorded``.

    A key missing from ``recorded`` counts as different, unless ``defaults`` holds it: a field
    added to a config after the file was written was added with a default that keeps the earlier
    behaviour, so the file matches when the expected value is that default.
    """
    expected, recorded = _normalise(expected), _normalise(recorded)
    defaults = _normalise(defaults or {})
    missing = object()

    def have(key):
        if key in recorded:
            return recorded[key]
        return defaults.get(key, missing)

    return sorted(k for k, v in expected.items() if have(k) != v)


@dataclass
class Experiment:
    """One run of one experiment script (see the module docstring)."""

    name: str
    title: str
    quick: bool
    results: Path  # results/NAME (or RESULTS_DIR/NAME with --results-dir)
    results_root: Path
    docs: Path
    command: str
    began: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    steps_reused: int = 0

    @classmethod
    def start(cls, name: str, title: str, argv: Sequence[str] | None = None,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
              description: str | None = None) -> tuple["Experiment", argparse.Namespace]:
        """Parse the common options (``--quick``, ``--results-dir``, ``--docs``) and the script's own."""
        parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description or title)
        parser.add_argument("--quick", action="store_true",
                            help="The same pipeline on a tiny budget (for tests); needs --results-dir.")
        parser.add_argument("--results-dir", type=Path, default=None,
                            help=f"Root of the outputs (default {RESULTS.relative_to(REPO)}/; required with --quick).")
        parser.add_argument("--docs", type=Path, default=None,
                            help="The results page to regenerate (default docs/results.md; RESULTS_DIR/results.md "
                                 "with --results-dir).")
        if add_arguments is not None:
            add_arguments(parser)
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        if args.quick and args.results_dir is None:
            parser.error("--quick needs --results-dir (a quick run never writes into results/)")
        root = (args.results_dir or RESULTS).resolve()
        if args.quick and (root == REPO or root.is_relative_to(RESULTS.resolve()) or RESULTS.resolve().is_relative_to(root)):
            parser.error(f"--quick must not write into {RESULTS.relative_to(REPO)}/ (it holds the measured results); "
                         "pass a --results-dir outside the repository's results")
        docs = args.docs or (DOCS_PAGE if args.results_dir is None else root / "results.md")
        shown = [a for a in argv if a]  # the command that regenerates this table
        command = shlex.join(["python", f"experiments/{name}.py", *shown])
        exp = cls(name, title, args.quick, root / name, root, Path(docs), command)
        exp.results.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] {title}{' (quick)' if args.quick else ''}: outputs in {exp.results}", flush=True)
        return exp, args

    def path(self, relative: str) -> Path:
        """A path under the results root, e.g. ``exp.path("unlearn/dpo_s50_test.json")``."""
        return self.results_root / relative

    def step(self, path: Path, expected: dict, compute: Callable[[], dict],
             recorded: Callable[[dict], dict] | None = None, defaults: dict | None = None) -> dict:
        """The JSON result of one step, computed only when no matching result exists.

        Args:
            path: where the step's JSON lives.
            expected: the configuration that defines the step (model, adapter, dtype, budget, ...).
            compute: makes the result (a JSON-serialisable dict) when it is missing or stale.
            recorded: reads the configuration a file records of itself (for files written by the
                CLI or by earlier versions); default: the ``step_config`` this method stamps.
            defaults: values of configuration fields added after a file was written
                (:func:`config_differences`).

        Returns:
            The result dict (with ``step_config`` and ``provenance`` for results made here).
        """
        label = path.relative_to(self.results_root) if path.is_relative_to(self.results_root) else path
        if path.is_file():
            data = json.loads(path.read_text())
            have = recorded(data) if recorded is not None else data.get("step_config", {})
            differs = config_differences(expected, have, defaults)
            if not differs:
                self.steps_reused += 1
                print(f"[{self.name}] {label}: done before, reused", flush=True)
                return data
            print(f"[{self.name}] {label}: recorded configuration differs in {differs}; recomputing", flush=True)
        print(f"[{self.name}] {label}: computing", flush=True)
        began = time.perf_counter()
        data = compute()
        data["step_config"] = _normalise(expected)
        data["provenance"] = self.provenance(time.perf_counter() - began)
        atomic_write_json(path, data)
        self.steps_done += 1
        print(f"[{self.name}] {label}: wrote it ({time.perf_counter() - began:.0f} s)", flush=True)
        return data

    def recorded_step(self, path: Path, expected: dict, recorded: Callable[[dict], dict] | None = None,
                      defaults: dict | None = None) -> tuple[dict | None, list[str] | None]:
        """A step's recorded result without computing anything (for rendering what is done so far).

        Returns:
            ``(data, None)`` when the file exists and its configuration matches (counted as reused);
            ``(None, None)`` when there is no file; ``(None, fields)`` when it was recorded with another
            configuration (the fields that differ).
        """
        if not path.is_file():
            return None, None
        data = json.loads(path.read_text())
        have = recorded(data) if recorded is not None else data.get("step_config", {})
        differs = config_differences(expected, have, defaults)
        if differs:
            return None, differs
        self.steps_reused += 1
        return data, None

    def provenance(self, seconds: float | None = None) -> dict:
        """Machine, date, command, package versions (and seconds) of something made now."""
        record = {"machine": machine_info(), "date": _dt.date.today().isoformat(), "command": self.command,
                  "quick": self.quick, "versions": package_versions()}
        if seconds is not None:
            record["seconds"] = round(seconds, 1)
        return record

    @staticmethod
    def origin(data: dict, path: Path) -> dict:
        """Date and machine of a result: its provenance, else the file's commit date and "not recorded"."""
        prov = data.get("provenance") or {}
        return {"date": prov.get("date") or git_date(path) or "unknown", "machine": describe_machine(prov.get("machine")),
                "recorded": bool(prov)}

    def finish(self, summary: dict, markdown: str, notes: str = "", pngs: Sequence[Path] = (),
               sources: Sequence[Path] = (), headline: Sequence[tuple[str, str]] = (),
               readme_blocks: dict[str, str] | None = None) -> None:
        """Write ``results.json``, ``table.md`` and ``section.md``, regenerate the results page, print wall time.

        Args:
            summary: the table as data (rows, targets, configuration).
            markdown: the table(s) in GitHub markdown.
            notes: text shown under the tables (generated from data, never typed numbers).
            pngs: figures written by the script (linked on the page).
            sources: the result files the table was read from (their dates and machines are listed).
            headline: at most a few ``(what, value)`` pairs, formatted from the data, for the short
                table in README.md (between its ``<!-- headline -->`` markers).
            readme_blocks: ``{key: markdown}`` generated from data, each written into README.md between its
                ``<!-- generated: KEY -->`` and ``<!-- /generated: KEY -->`` markers (where the README has them).
        """
        readme_blocks = readme_blocks or {}
        seconds = time.perf_counter() - self.began
        recorded = {p: json.loads(p.read_text()) for p in sources if p.is_file()}  # each source read once
        origins = {str(p.relative_to(self.results_root) if p.is_relative_to(self.results_root) else p):
                   self.origin(data, p) for p, data in recorded.items()}
        atomic_write_json(self.results / "results.json", {
            "experiment": self.name, "title": self.title, "quick": self.quick, **summary,
            "headline": [{"what": what, "value": value} for what, value in headline],
            "readme_blocks": dict(readme_blocks),
            "command": self.command,
            "sources": origins, "provenance": self.provenance(seconds),
            "steps": {"computed": self.steps_done, "reused": self.steps_reused}})
        atomic_write_text(self.results / "table.md", markdown.rstrip() + "\n")
        lines = [f"## {self.title}", "", f"Regenerate: `{self.command}`", ""]
        dates = sorted({o["date"] for o in origins.values()})
        machines = describe_machines([(data.get("provenance") or {}).get("machine") for data in recorded.values()])
        if dates:
            lines.append(f"Results dated {', '.join(dates)}; machine: {'; '.join(machines)}.")
        lines.append(f"Page section written {_dt.date.today().isoformat()} by `experiments/{self.name}.py` "
                     f"({'quick' if self.quick else 'full'} mode).")
        lines += ["", markdown.rstrip(), ""]
        if notes:
            lines += [notes.rstrip(), ""]
        for png in pngs:
            rel = os.path.relpath(png, self.docs.parent)
            lines += [f"![{png.stem}]({rel})", ""]
        if origins:
            lines += ["<details><summary>source files</summary>", ""]
            lines += [f"- `{name}`: {o['date']}, {o['machine']}" for name, o in origins.items()]
            lines += ["", "</details>", ""]
        atomic_write_text(self.results / "section.md", "\n".join(lines))
        render_page(self.results_root, self.docs)
        if self.docs.resolve() == DOCS_PAGE.resolve() and self.results_root == RESULTS.resolve():
            from readme_common import render_readme

            render_readme(self.results_root, README, EXPERIMENTS)
        print(f"[{self.name}] done in {seconds:.0f} s ({self.steps_done} steps computed, {self.steps_reused} reused); "
              f"table: {self.results / 'table.md'}; page: {self.docs}", flush=True)


def render_page(results_root: Path = RESULTS, docs: Path = DOCS_PAGE) -> None:
    """Join every experiment's ``section.md`` (in :data:`EXPERIMENTS` order) into the results page."""
    lines = ["# amendlm results", "",
             "Generated by the scripts under `experiments/` (each section by the script it names); "
             "do not edit by hand.  `make results` regenerates every section; a script reuses every "
             "result whose recorded configuration matches and computes only what is missing.", ""]
    missing = []
    for name in EXPERIMENTS:
        section = results_root / name / "section.md"
        if section.is_file():
            lines += [section.read_text().rstrip(), ""]
        else:
            missing.append(name)
    if missing:
        lines += ["## Not yet generated", "",
                  *[f"- `python experiments/{name}.py`" for name in missing], ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs, "\n".join(lines))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; floats get two decimals, None shows as n/a.

    ``align``: one character per column, ``l`` or ``r`` (default: first left, rest right).
    """
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    align = align or ("l" + "r" * (len(header) - 1))
    marks = [":---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- evaluation steps
# (in eval_common.py, re-exported here for the scripts that import them from common)
from eval_common import (EVAL_FIELDS_ADDED, eval_defaults, eval_expected, eval_recorded, resolved_dtype,  # noqa: E402,F401
                         run_eval)
