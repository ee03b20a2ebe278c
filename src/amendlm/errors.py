"""How the command line reports input errors: one clear line and exit status 1.

Command modules import :func:`user_errors` from here (never from :mod:`amendlm.cli`, which
imports them to register their commands), so the package has no import circle.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import typer


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
