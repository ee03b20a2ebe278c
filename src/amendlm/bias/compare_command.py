"""``amendlm compare``: a thin command over :mod:`amendlm.bias.compare`.

Registered on the main app by :func:`register` (called at the end of ``amendlm.cli``).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def parse_run(argument: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> ``(LABEL, PATH)``; a bare ``PATH`` (or an existing file whose name holds
    ``=``) is labelled with its file stem.

    Raises:
        ValueError: an empty label or path (``=x.json``, ``before=``).
    """
    if "=" in argument and not Path(argument).is_file():
        label, path = argument.split("=", 1)
        if not label.strip() or not path.strip():
            raise ValueError(f"'{argument}': expected LABEL=PATH or PATH")
        return label.strip(), Path(path)
    return Path(argument).stem, Path(argument)


def compare(
    runs: List[str] = typer.Argument(..., metavar="LABEL=PATH", help="amendlm eval results JSONs, first = before; a bare PATH is labelled by its file stem."),
    targets: bool = typer.Option(False, "--targets", help="Check the BiasUnlearn targets (issue 3) of the last run against the first; a report, the exit code stays 0."),
    markdown: Optional[Path] = typer.Option(None, help="Also write the table as GitHub markdown here (atomically)."),
) -> None:
    """Compare the results JSONs of several amendlm eval runs side by side."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from amendlm.bias.compare import COLUMNS, check_targets, comparison_rows, format_value, load_eval, markdown_table
    from amendlm.cli import user_errors
    from amendlm.report import atomic_write_text

    if targets and len(runs) < 2:
        raise typer.BadParameter("--targets needs at least two runs (the first is 'before', the last 'after')")
    with user_errors():
        loaded = [(label, load_eval(path)) for label, path in map(parse_run, runs)]
    rows = comparison_rows(loaded)
    console = Console()
    # one column per run so that the table fits a terminal (the markdown file has one row per run)
    table = Table(title="amendlm eval results (StereoSet overall = intra + inter; ideal SS 50, LMS 100, CrowS 50)")
    table.add_column("metric")
    for row in rows:
        table.add_column(escape(row["run"]), justify="right", overflow="fold")
    for key, header in COLUMNS[1:]:
        table.add_row(header, *(format_value(row[key]) for row in rows))
    console.print(table)
    if targets:
        (before_label, before), (after_label, after) = loaded[0], loaded[-1]
        checks = Table(title=f"BiasUnlearn targets: {escape(before_label)} → {escape(after_label)}")
        for column in ("target", "result", "measured"):
            checks.add_column(column)
        results = check_targets(before, after)
        for name, passed, measured in results:
            checks.add_row(name, "[green]pass[/green]" if passed else "[red]miss[/red]", measured)
        console.print(checks)
        console.print(f"{sum(passed for _, passed, _ in results)} of {len(results)} targets met"
                      + ("" if len(results) == 6 else " (targets without both runs' numbers are omitted)"))
    if markdown is not None:
        with user_errors():
            atomic_write_text(markdown, markdown_table(rows))
        typer.echo(f"wrote {markdown}")


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the ``amendlm`` app."""
    app.command("compare")(compare)
