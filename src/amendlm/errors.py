"""How the command line reports input errors: one clear line on stderr.

* :func:`user_errors`: a bad file, row, adapter or model path -> ``error: ...``, exit status 1;
* :func:`check_out_file` / :func:`check_out_directory`: an ``--out`` path that cannot be written,
  refused before any model loads (as ``ValueError``, for :func:`user_errors`);
* :func:`optional_name`: an option naming a dataset that ``none`` (or ``''``) turns off;
* :func:`required_in_help`: a command whose help marks options required that the command checks
  itself (so that every missing input is named in one error);
* :class:`OneLineUsageErrors`: a usage error (unknown or missing option, invalid value,
  ``typer.BadParameter`` raised by a command) -> ``error: ... (see 'amendlm CMD --help')``, exit
  status 2, instead of click's usage lines and rich's boxed panel; ``--help`` is untouched.

Command modules import from here (never from :mod:`amendlm.cli`, which imports them to register
their commands), so the package has no import circle.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import typer
from typer.core import TyperCommand, TyperGroup

# the click exceptions typer raises: those of the click it bundles (typer >= 0.16: typer._click), found
# from a public name so that an unbundled click works too
_click_exceptions = importlib.import_module(typer.BadParameter.__module__)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn input errors (bad file, row, adapter, unreachable model) into one clear line and exit 1.

    Catches :class:`amendlm.data.io.DataError`, ``FileNotFoundError``, ``ValueError`` and
    ``OSError``; prints ``error: <first line of the message>`` on stderr and raises
    ``typer.Exit(1)``.  Programming errors still show their traceback; ``amendlm -v`` (INFO
    logging) re-raises these too, with their traceback.
    """
    from amendlm.data.io import DataError

    try:
        yield
    except (DataError, FileNotFoundError, ValueError, OSError) as err:
        if logging.getLogger().isEnabledFor(logging.INFO):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None


def _check_parent(path: Path, option: str) -> None:
    for parent in path.parents:  # the nearest existing one must be a directory (the rest are created)
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: parent {parent} is not a directory")
            return


def check_out_file(path: Optional[str | Path], option: str = "--out", example: str = "out.json") -> None:
    """Refuse, before anything runs, an output *file* path that the final atomic write would fail on.

    ``None`` (no output asked for) passes.  Nothing is created.

    Raises:
        ValueError: ``path`` is an existing directory (the message suggests ``path/example``), or
            its nearest existing parent is not a directory; one line naming ``option``.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file path such as {path / example}")
    _check_parent(path, option)


def check_out_directory(path: Optional[str | Path], option: str = "--out") -> None:
    """Refuse, before anything runs, an output *directory* path that is an existing file or lies under one.

    Raises:
        ValueError: one line naming ``option`` and the path.
    """
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: is a file, not a directory; give a new directory path")
    _check_parent(path, option)


def optional_name(value: Optional[str]) -> Optional[str]:
    """The value of an option naming a dataset or file that can be turned off (``--kl-texts``).

    ``None``, ``''`` and ``'none'`` in any case (``none``, ``None``, ``NONE``) -> ``None`` (off); any
    other value is returned unchanged (a name or path, checked where it is read).
    """
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return value


def usage_error_line(err) -> str:
    """The one line a usage error is reported as: ``error: <message> (see '<command> --help')``.

    A ``BadParameter`` without a parameter (raised by a command body from a config's
    ``ValueError``) is its message alone; others are click's message ("Missing option '--out'.",
    "No such option: --nope", "Invalid value for '--max-steps': ...").  Line breaks are folded.
    """
    if isinstance(err, _click_exceptions.BadParameter) and err.param is None and err.param_hint is None:
        message = err.message
    else:
        message = err.format_message()
    message = " ".join(str(message).split()).rstrip(".") or type(err).__name__
    ctx = getattr(err, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None and isinstance(err, _click_exceptions.UsageError) else ""
    return f"error: {message}{hint}"


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    try:
        yield
    except _click_exceptions.ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `amendlm` / `amendlm align` alone: the help, as typer shows it
            raise
        typer.secho(usage_error_line(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=err.exit_code) from None


class OneLineUsageErrors(TyperGroup):
    """The root command group (``typer.Typer(cls=OneLineUsageErrors)``): click exceptions raised
    while parsing or running any command below it are reported by :func:`usage_error_line` and
    exit with click's status (2 for usage errors) instead of click's usage text and rich's panel."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line():
            return super().invoke(ctx)


def required_in_help(*names: str) -> type:
    """A ``TyperCommand`` class (``@app.command(cls=...)``) whose ``--help`` marks the options ``names`` as
    required, as typer marks ``typer.Option(...)``, while click does not enforce them: the command checks
    them itself, together with its other inputs, and names every missing one in one error."""

    class RequiredInHelp(TyperCommand):
        def format_help(self, ctx, formatter):
            marked = [param for param in self.params if param.name in names and not param.required]
            for param in marked:
                param.required = True
            try:
                return super().format_help(ctx, formatter)
            finally:
                for param in marked:
                    param.required = False

    return RequiredInHelp
