"""Reading rows from jsonl / json / csv files and lines from txt files, with errors that name
the file, row (or line) and field."""

from __future__ import annotations

import codecs
import csv
import json
from io import StringIO
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A malformed input file; the message names the file, the 1-based row or line and the field."""


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 file as text (a byte-order mark is dropped, line endings kept).

    Raises:
        DataError: the file is not UTF-8 (names the file and the 1-based line of the first bad byte).
    """
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = len(split_lines(data[:err.start].decode("utf-8")))
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def split_lines(text: str) -> list[str]:
    """Split at ``\\n``, ``\\r\\n`` and ``\\r`` only (not at form feeds or U+2028 as :meth:`str.splitlines` does)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a ``.txt`` file, one text per line, without their line endings.

    Lines holding only whitespace are skipped; the others are kept as they are.

    Raises:
        DataError: not UTF-8 (names the file and line), or no non-blank line.
    """
    lines = [line for line in split_lines(read_text(path)) if line.strip()]
    if not lines:
        raise DataError(f"{path}: file has no non-blank lines")
    return lines


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``.jsonl``, ``.json`` (list of objects) or ``.csv`` file into a list of dicts.

    Row numbers in errors (here and in the loaders) are 1-based data rows: blank lines and the
    CSV header are not counted, so "row 3" is the third record, however the file is laid out.
    A UTF-8 byte-order mark is ignored.

    Raises:
        DataError: not UTF-8, empty file, invalid JSON on a line, a row that is not an object, a CSV row
            with the wrong number of fields, or an unknown extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = list(_read_jsonl(path))
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = data
    elif suffix == ".csv":
        rows = list(_read_csv(path))
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .csv)")
    if not rows:
        raise DataError(f"{path}: file has no data rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected an object, got {type(row).__name__}")
    return rows


def _read_jsonl(path: Path) -> Iterator[dict]:
    number = 0
    for line in split_lines(read_text(path)):
        if not line.strip():
            continue
        number += 1
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} row {number}: invalid JSON ({err.msg})") from None


def _read_csv(path: Path) -> Iterator[dict]:
    reader = csv.reader(StringIO(read_text(path), newline=""))  # newline="": quoted fields may span lines
    header = next(reader, None)
    if header is None:
        return
    number = 0
    for values in reader:
        if not values:
            continue
        number += 1
        if len(values) != len(header):
            raise DataError(
                f"{path} row {number}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}"
            )
        yield dict(zip(header, values))


def require_text(row: dict, field: str, path: str | Path, number: int) -> str:
    """Return ``row[field]`` as a non-empty string.

    Raises:
        DataError: the field is missing, not a string, or blank.
    """
    if field not in row or row[field] is None:
        raise DataError(f"{path} row {number}: missing field '{field}'")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{path} row {number}: field '{field}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path} row {number}: field '{field}' is empty")
    return value
