"""Plain-text and prompt/response datasets: the WikiText sample, the XSum sample, generic jsonl."""

from __future__ import annotations

from pathlib import Path

from amendlm.data.io import DataError, read_rows, require_text
from amendlm.resources import resolve_dataset


def load_texts(source: str | Path = "wikitext-sample", field: str = "text", field_option: str | None = None) -> list[str]:
    """Load one text field from every row of a jsonl/json/csv file (blank texts are kept out).

    Args:
        field_option: the option that chooses ``field`` (``--kl-text-field``), named in the error
            for a missing field; None: the field is fixed.

    Raises:
        DataError: a row lacks ``field`` (names the file, the row, the field, the fields the row has and
            ``field_option``) or holds a non-string.
    """
    path = resolve_dataset(source)
    texts = []
    for number, row in enumerate(read_rows(path), start=1):
        if field not in row or row[field] is None:
            has = ", ".join(map(str, row)) or "none"
            change = f"; give the field holding the text with {field_option}" if field_option else ""
            raise DataError(f"{path} row {number}: missing field '{field}' (the row's fields: {has}){change}")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{path} row {number}: field '{field}' must be text, got {type(value).__name__}")
        if value.strip():
            texts.append(value)
    return texts


def load_prompt_response(source: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[dict]:
    """Load ``{"id", "prompt", "response"}`` records from a jsonl/json/csv file.

    Raises:
        DataError: a row lacks either field or has an empty one (names the file, row and field).
    """
    path = resolve_dataset(source)
    records = []
    for number, row in enumerate(read_rows(path), start=1):
        records.append(
            {
                "id": str(row.get("id", number)),
                "prompt": require_text(row, prompt_field, path, number),
                "response": require_text(row, response_field, path, number),
            }
        )
    return records
