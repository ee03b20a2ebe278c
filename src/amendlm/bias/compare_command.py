"""``amendlm compare``: a thin command over :mod:`amendlm.bias.compare`.

Registered on the main app by :func:`register` (called at the end of ``amendlm.cli``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer

if TYPE_CHECKING:
    from amendlm.bias.compare import TargetCheck

RESULT_MARKUP = {True: "[green]pass[/green]", False: "[red]miss[/red]", None: "[yellow]n/a[/yellow]"}


def parse_run(argument: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> ``(LABEL, PATH)``; a bare ``PATH`` is labelled with its file stem.

    The argument is split at its first ``=`` only when the part before it holds no ``/`` (nor
    ``os.sep``): ``before=runs/a.json`` is a label and a path, ``runs/a=b.json`` a path.  A file of
    the current directory whose name holds ``=`` is given as ``./a=b.json``.

    Raises:
        ValueError: an empty label or path (``=x.json``, ``before=``).
    """
    label, equals, path = argument.partition("=")
    if equals and "/" not in label and os.sep not in label:
        if not label.strip() or not path.strip():
            raise ValueError(f"'{argument}': expected LABEL=PATH or PATH")
        return label.strip(), Path(path)
    return Path(argument).stem, Path(argument)


def format_check(check: TargetCheck) -> tuple[str, str, str, str, str]:
    """The cells of one target row (rich markup): target, result, value, bound, detail."""
    from rich.markup import escape

    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}"

    return check.name, RESULT_MARKUP[check.passed], number(check.value), number(check.bound), escape(check.detail)


def format_difference(test: dict | None) -> str:
    """``-3.21 [-5.0, -1.4] (p 0.002)`` for a paired test dict, ``—`` for None."""
    if test is None:
        return "—"
    return f"{test['value']:+.2f} [{test['low']:+.1f}, {test['high']:+.1f}] (p {test['p']:.3f})"


def compare(
    runs: List[str] = typer.Argument(..., metavar="LABEL=PATH", help="amendlm eval results JSONs, first = before; a bare PATH (or one with a '/' before its first '=') is labelled by its file stem."),
    targets: bool = typer.Option(False, "--targets", help="Check the BiasUnlearn targets (overall SS 50±2, every type 50±4 and ≥ 46, LMS drop ≤ 2, perplexity ≤ +5 %, CrowS closer to 50) of the last run against the first (the runs must share data and settings); a report, the exit code stays 0 unless --strict."),
    strict: bool = typer.Option(False, "--strict", help="With --targets: exit 1 if any target is missed or n/a."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the table (and with --targets the target checks) as GitHub markdown here (atomically)."),
    out: Optional[Path] = typer.Option(None, help="Write the rows (with 95 % intervals and paired tests against the first run) and the target checks as JSON here (atomically)."),
) -> None:
    """Compare the results JSONs of several amendlm eval runs side by side."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from amendlm.bias.compare import (COLUMNS, TARGET_NAMES, check_targets, comparison_rows, format_cell, load_eval,
                                      markdown_table, markdown_targets)
    from amendlm.errors import check_out_file, user_errors
    from amendlm.report import atomic_write_json, atomic_write_text

    if strict and not targets:
        raise typer.BadParameter("--strict applies to --targets; add --targets")
    if targets and len(runs) < 2:
        raise typer.BadParameter("--targets needs at least two runs (the first is 'before', the last 'after')")
    checks = None
    with user_errors():
        check_out_file(markdown, "--markdown", example="compare.md")  # before anything is read or printed
        check_out_file(out, example="compare.json")
        parsed = [parse_run(argument) for argument in runs]
        labels = [label for label, _ in parsed]
        twice = next((label for label in labels if labels.count(label) > 1), None)
        if twice is not None:  # the paired differences and the targets name runs by their labels
            raise ValueError(f"the label '{twice}' names {labels.count(twice)} runs: give each run its own LABEL=PATH")
        loaded = [(label, load_eval(path)) for label, path in parsed]
        if targets:  # before anything is printed: runs that are not comparable are an error
            checks = check_targets(loaded[0][1], loaded[-1][1], str(parsed[0][1]), str(parsed[-1][1]))
    with user_errors():
        rows = comparison_rows(loaded)
    console = Console()
    # one column per run so that the table fits a terminal (the markdown file has one row per run)
    table = Table(title="amendlm eval results (StereoSet overall = intra + inter; ideal SS 50, LMS 100, CrowS 50)")
    table.add_column("metric")
    for row in rows:
        table.add_column(escape(row["run"]), justify="right", overflow="fold")
    for key, header in COLUMNS[1:]:
        table.add_row(header, *(format_cell(row, key) for row in rows))
    console.print(table)
    paired = [row for row in rows[1:] if any(row["vs_first"].values())]
    if paired:
        diff = Table(title=f"Paired difference to {escape(rows[0]['run'])}: value [95 % bootstrap interval] (p); "
                           "SS, LMS over target terms, CrowS over pairs")
        diff.add_column("run")
        for metric in ("SS", "LMS", "CrowS"):
            diff.add_column(metric, justify="right")
        for row in paired:
            diff.add_row(escape(row["run"]), *(format_difference(row["vs_first"][m]) for m in ("ss", "lms", "crows")))
        console.print(diff)
    if checks is not None:
        title = f"BiasUnlearn targets: {escape(loaded[0][0])} → {escape(loaded[-1][0])} (SS, LMS, CrowS in points; perplexity increase in %)"
        report = Table(title=title)
        for column in ("target", "result", "value", "bound", "detail"):
            report.add_column(column, justify="right" if column in ("value", "bound") else "left")
        for check in checks:
            report.add_row(*format_check(check))
        console.print(report)
        met, not_available = sum(c.passed is True for c in checks), sum(c.passed is None for c in checks)
        console.print(f"{met} of {len(TARGET_NAMES)} targets met"
                      + (f" ({not_available} n/a: a run lacks their numbers)" if not_available else ""))
    if markdown is not None:
        with user_errors():
            tables = markdown_table(rows)
            if checks is not None:
                tables += "\n" + markdown_targets(checks, loaded[0][0], loaded[-1][0])
            atomic_write_text(markdown, tables)
        typer.echo(f"wrote {markdown}")
    if out is not None:
        with user_errors():
            atomic_write_json(out, {"rows": rows, "targets": None if checks is None else [c.__dict__ for c in checks]})
        typer.echo(f"wrote {out}")
    if strict and any(check.passed is not True for check in checks):
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the ``amendlm`` app."""
    app.command("compare")(compare)
