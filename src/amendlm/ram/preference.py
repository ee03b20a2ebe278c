"""Preference pairs for ``align train --pairs``: a debiasing aligner trained on StereoSet train targets.

A pair shares its context and differs in the continuation: ``chosen`` (the one the aligner should
prefer) and ``rejected``.  Two sources:

* **StereoSet** (``--pairs stereoset``, the embedded dev set, or a local file with StereoSet's
  fields): the clusters of the **train** target terms only (:func:`amendlm.data.splits.select_split`,
  the split BiasUnlearn trains on), one pair per cluster exactly as BiasUnlearn's DPO pairs
  (:func:`amendlm.unlearn.data.build_sets`): chosen = the anti-stereotype, rejected = the
  stereotype, each as its ``(prefix, continuation)`` training pair (intrasentence: the loss covers
  the filled-in word and the rest of the sentence; intersentence: the candidate after the context).
  The val target terms are left for decisions and the test target terms for the table.
* **a preference file** (jsonl / json / csv whose rows have ``prompt``, ``chosen``, ``rejected``):
  chosen and rejected are continuations of ``prompt`` as written (give a leading space where a word
  follows the prompt: ``" She is a nurse."``).

Encoding is the scorer's, raw text with no chat template (:func:`amendlm.scoring.encode_pairs`:
``[start] + tokens(prefix + continuation)``, the continuation's tokens scored), so the aligner is
trained on exactly the token sequences StereoSet, CrowS-Pairs and perplexity score.

The *neutral* text of the KL regulariser is the text BiasUnlearn keeps its model close to the
reference on (:func:`amendlm.unlearn.data.build_sets` ``.kl``): the unrelated sentences of the
train clusters (StereoSet sources) and chunks of a general text (``kl_texts``, the first 50 XSum
documents by default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from amendlm.data.io import DataError, read_rows, require_text
from amendlm.resources import resolve_dataset

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
STEREOSET_DEFAULT = "stereoset"


@dataclass
class PairsConfig:
    """The pairs of an ``align train --pairs`` run and the controls that keep the pair a language model.

    Attributes:
        source: ``stereoset`` (embedded), a StereoSet-format file, or a preference file (module docstring).
        split_seed: seed of StereoSet's target-term split (:func:`amendlm.data.splits.split_targets`). 0.
        limit: only the first N pairs (None: all; 2,520 for the embedded StereoSet's train targets).
        kl_weight: weight of the regulariser ``KL(P_M || pair)`` on neutral text, per scored position
            (:func:`amendlm.ram.losses.product_kl_sums`); 0 = none.  1.0.
        kl_unrelated: the unrelated sentences of the train clusters are in the neutral set (True, as in
            BiasUnlearn).  Their prefixes are the pairs' own contexts, so the regulariser there also
            holds back the change at the very position the pairs move; False keeps the general text only.
        kl_texts, kl_text_field, kl_text_limit, kl_chunk_tokens: the general text of the neutral set
            and how it is cut (BiasUnlearn's defaults: the first 50 XSum documents in 64-token chunks);
            ``kl_texts=None``: StereoSet's unrelated sentences only.
        kl_batch_size: neutral examples per optimizer step. 8.
        max_length: neutral examples are cut to this many tokens (the continuation kept). 128.
        val_every: evaluate the pair on StereoSet's **val** targets before training, every N optimizer
            steps and at the last step, and keep the best evaluation's aligner; 0 = no evaluation (the
            last step's aligner is kept).  20.
        val_stereoset: the StereoSet data of those evaluations (None: ``source`` when it is StereoSet,
            else the embedded ``stereoset``).
        val_clusters: val clusters scored per evaluation, stratified by bias type (None: all).
        max_lms_drop: the kept evaluation is the smallest worst per-type ``|SS - 50|`` among those whose
            overall val LMS fell at most this many points from step 0 (BiasUnlearn's
            ``gap_within_lms`` rule, :func:`amendlm.unlearn.evaluation.lms_qualifies`). 2.0.
    """

    source: str = STEREOSET_DEFAULT
    split_seed: int = 0
    limit: int | None = None
    kl_weight: float = 1.0
    kl_unrelated: bool = True
    kl_texts: str | None = "xsum-sample"
    kl_text_field: str = "document"
    kl_text_limit: int | None = 50
    kl_chunk_tokens: int = 64
    kl_batch_size: int = 8
    max_length: int = 128
    val_every: int = 20
    val_stereoset: str | None = None
    val_clusters: int | None = None
    max_lms_drop: float = 2.0

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise ValueError("pairs: give a source (stereoset, or a file)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"pairs limit must be >= 1, got {self.limit}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kl_chunk_tokens < 2:
            raise ValueError(f"kl_chunk_tokens must be >= 2, got {self.kl_chunk_tokens}")
        for name in ("kl_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0 = no val evaluation), got {self.val_every}")
        if self.val_clusters is not None and self.val_clusters < 1:
            raise ValueError(f"val_clusters must be >= 1 or None, got {self.val_clusters}")
        if self.max_lms_drop < 0:
            raise ValueError(f"max_lms_drop must be >= 0, got {self.max_lms_drop}")
        if self.kl_text_limit is not None and self.kl_text_limit < 0:
            raise ValueError(f"kl_text_limit must be >= 0 or None, got {self.kl_text_limit}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stereoset_source(self) -> bool:
        """Whether ``source`` is StereoSet (else a preference file): :func:`is_preference_file`."""
        return not is_preference_file(self.source)

    @property
    def val_source(self) -> str:
        """The StereoSet data of the val evaluations."""
        if self.val_stereoset is not None:
            return self.val_stereoset
        return self.source if self.stereoset_source else STEREOSET_DEFAULT


@dataclass(frozen=True)
class PreferenceRecord:
    """One pair: ``chosen`` and ``rejected`` as ``(prefix, continuation)``, the loss on the continuation."""

    id: str
    chosen: tuple[str, str]
    rejected: tuple[str, str]
    bias_type: str = ""


def is_preference_file(source: str) -> bool:
    """True when ``source`` is a local file whose first row has any of ``prompt``, ``chosen``, ``rejected``.

    Raises:
        FileNotFoundError: neither an embedded dataset nor a file (:func:`amendlm.resources.resolve_dataset`).
    """
    if str(source) == STEREOSET_DEFAULT:
        return False
    rows = read_rows(resolve_dataset(source))
    return bool(rows) and any(name in rows[0] for name in PREFERENCE_FIELDS)


def preference_records(config: PairsConfig) -> list[PreferenceRecord]:
    """The pairs of ``config`` (see the module docstring), in data order, at most ``limit``.

    Raises:
        FileNotFoundError: no such dataset or file.
        amendlm.data.io.DataError: a row lacks a field or has an empty one (names file, row, field).
        ValueError: no pair at all (e.g. a split with no train target).
    """
    if config.stereoset_source:
        records = _stereoset_records(config)
    else:
        path = resolve_dataset(config.source)
        records = []
        for number, row in enumerate(read_rows(path), start=1):
            prompt, chosen, rejected = (_text(row, name, path, number) for name in PREFERENCE_FIELDS)
            records.append(PreferenceRecord(str(row.get("id", number)), (prompt, chosen), (prompt, rejected)))
    records = records[: config.limit] if config.limit else records
    if not records:
        raise DataError(f"{config.source}: no preference pairs")
    return records


def _text(row: dict, name: str, path, number: int) -> str:
    """``prompt`` may be empty (a sentence scored whole); ``chosen`` and ``rejected`` may not."""
    if name == "prompt" and row.get(name) == "":
        return ""
    return require_text(row, name, path, number)


def train_clusters(config: PairsConfig):
    """The StereoSet clusters of the train target terms of ``config.source``."""
    from amendlm.data.splits import select_split
    from amendlm.data.stereoset import load_stereoset

    return select_split(load_stereoset(config.source), "train", config.split_seed)


def _stereoset_records(config: PairsConfig) -> list[PreferenceRecord]:
    from amendlm.unlearn.data import build_sets

    pairs = build_sets(train_clusters(config), adversarial_fraction=0.0, kl_unrelated=False).pairs
    return [PreferenceRecord(p.chosen.cluster_id, (p.chosen.prefix, p.chosen.continuation),
                             (p.rejected.prefix, p.rejected.continuation), p.chosen.bias_type) for p in pairs]


def encode_records(tokenizer, records: list[PreferenceRecord]):
    """The records as :class:`amendlm.ram.examples.PairExample` s (positive = chosen, negative = rejected).

    Raises:
        ValueError: a continuation has no tokens or a token spans its prefix's end (names the pair's id).
    """
    from amendlm.ram.examples import PairExample
    from amendlm.scoring import encode_pairs

    examples = []
    for record in records:
        try:
            chosen, rejected = encode_pairs(tokenizer, [record.chosen, record.rejected])
        except ValueError as err:
            raise ValueError(f"pair '{record.id}': {err}") from None
        examples.append(PairExample(record.id, chosen, rejected))
    return examples


def neutral_examples(config: PairsConfig, tokenizer) -> list:
    """The tokenized neutral set of the regulariser (:class:`amendlm.scoring.EncodedPair` s, right-paddable).

    Raises:
        ValueError: the neutral set is empty (a preference file with ``kl_texts=None``).
    """
    from amendlm.data.text import load_texts
    from amendlm.unlearn.data import build_sets, text_chunks
    from amendlm.unlearn.streams import encode_examples

    texts = load_texts(config.kl_texts, field=config.kl_text_field) if config.kl_texts else []
    texts = texts[: config.kl_text_limit] if config.kl_text_limit is not None else texts
    general = text_chunks(texts, tokenizer, config.kl_chunk_tokens)
    clusters = train_clusters(config) if config.stereoset_source and config.kl_unrelated else []
    neutral = build_sets(clusters, 0.0, general_texts=general).kl if clusters else general
    if not neutral:
        raise ValueError("the neutral set of the KL regulariser is empty: give kl_texts (or kl_weight 0)")
    return encode_examples(tokenizer, neutral, config.max_length)


def val_clusters(config: PairsConfig, seed: int = 0):
    """The StereoSet clusters of the **val** target terms the pair is evaluated on (``val_clusters``
    stratified by bias type, :func:`amendlm.unlearn.evaluation.stratified_sample`).

    Raises:
        ValueError: the split left no val cluster.
    """
    from amendlm.data.splits import select_split
    from amendlm.data.stereoset import load_stereoset
    from amendlm.unlearn.evaluation import stratified_sample

    clusters = stratified_sample(select_split(load_stereoset(config.val_source), "val", config.split_seed),
                                 config.val_clusters, seed)
    if not clusters:
        raise ValueError(f"{config.val_source}: the target-term split left no val cluster")
    return clusters


def check_pairs(config: PairsConfig) -> None:
    """Every check of the pairs' data that needs no model: pairs, neutral texts, val data.

    Raises:
        FileNotFoundError, amendlm.data.io.DataError, ValueError: one line naming the file, row or field.
    """
    from amendlm.data.text import load_texts

    preference_records(config)
    if config.kl_weight > 0 and config.kl_texts:
        load_texts(config.kl_texts, field=config.kl_text_field, field_option="--kl-text-field")
    if config.kl_weight > 0 and not config.kl_texts and not (config.stereoset_source and config.kl_unrelated):
        raise ValueError("the KL regulariser has no neutral text (no --kl-texts, and no StereoSet unrelated sentences: "
                         "a preference file or --no-kl-unrelated); give --kl-texts or --kl-weight 0")
    if config.val_every:
        val_clusters(config)
