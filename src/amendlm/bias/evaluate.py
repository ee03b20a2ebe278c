"""Benchmark runners: score a model on StereoSet, CrowS-Pairs and WikiText perplexity.

Each benchmark is a function ``(model, tokenizer, config) -> dict`` registered in
:data:`BENCHMARKS`; the scoring itself goes through :mod:`amendlm.scoring`, and the counting
through the pure functions of :mod:`amendlm.bias.metrics`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from amendlm.bias.metrics import (
    ClusterOutcome,
    cluster_outcome,
    crows_score,
    stereoset_score,
)
from amendlm.data.crows_pairs import load_crows_pairs
from amendlm.data.io import DataError
from amendlm.data.splits import DEFAULT_SEED, SPLITS, select_split
from amendlm.data.stereoset import LABELS, StereoSetCluster, load_stereoset
from amendlm.data.text import load_texts
from amendlm.modeling import (AUTO_DTYPE, dtype_name, dtype_record, eval_mode, pad_token_id, parse_dtype, resolve_dtype,
                              start_token_id)
from amendlm.product import AlignerConfig, ProductLM, aligner_record, check_aligner, load_product
from amendlm.provenance import weights_record
from amendlm.resources import file_sha256, resolve_dataset
from amendlm.scoring import EncodedPair, score_encoded, score_pairs


@dataclass
class EvalConfig:
    """Options of ``amendlm eval``.

    Attributes:
        benchmarks: names from :data:`BENCHMARKS`.
        split: StereoSet target-term split to report on (``test`` for held-out numbers; ``all``
            is the whole dev set as published).  CrowS-Pairs and WikiText are always whole.
        split_seed: seed of the target-term split (:func:`amendlm.data.splits.split_targets`).
        limit: keep the first N examples of each benchmark (None: all) — for smoke runs.
        dtype: ``fp32`` (exact, default), ``bf16`` (autocast; fast only on CPUs with native bf16) or
            ``auto`` (bf16 where the model's device does bf16 natively fast, else fp32;
            :func:`amendlm.modeling.resolve_dtype`).  :func:`evaluate` records the resolved one.
        batch_size: sequences per forward pass.
        start_token: see :func:`amendlm.modeling.start_token_id`.
        share_prefix: compute the tokens the three candidates of a StereoSet context share once
            (:func:`amendlm.scoring.score_grouped`; same scores).  Turn off for models that do not
            accept a 4-D attention mask (e.g. flash-attention kernels).
        stereoset / crows_pairs / wikitext: dataset names or local files.
        ppl_window / ppl_stride: perplexity window length and stride in tokens.
    """

    benchmarks: list[str] = field(default_factory=lambda: ["stereoset", "crows-pairs", "perplexity"])
    split: str = "all"
    split_seed: int = DEFAULT_SEED
    limit: int | None = None
    dtype: str = "fp32"
    batch_size: int = 32
    start_token: str | None = None
    stereoset: str = "stereoset"
    crows_pairs: str = "crows-pairs"
    wikitext: str = "wikitext-sample"
    share_prefix: bool = True
    ppl_window: int = 512
    ppl_stride: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHMARKS)}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split '{self.split}'; valid: {', '.join(SPLITS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.ppl_stride < self.ppl_window:
            raise ValueError(f"need 0 < ppl_stride < ppl_window, got stride {self.ppl_stride}, window {self.ppl_window}")
        parse_dtype(self.dtype)


def check_data(config: EvalConfig) -> None:
    """Load and validate every dataset the selected benchmarks need (seconds, no model).

    Called before a model is loaded so that a wrong path or a malformed row fails at once
    instead of after an earlier benchmark has run.

    Raises:
        FileNotFoundError, DataError: as the loaders do (naming file, row and field).
    """
    loaders = {"stereoset": load_stereoset, "crows-pairs": load_crows_pairs, "perplexity": load_texts}
    for name in config.benchmarks:
        loaders[name](getattr(config, BENCHMARKS[name].data_field))


def compute_dtype(model, config: EvalConfig) -> torch.dtype:
    """``config.dtype`` as a torch dtype; ``auto`` is decided for the device of the model's weights."""
    if config.dtype != AUTO_DTYPE:
        return parse_dtype(config.dtype)
    return resolve_dtype(config.dtype, next(model.parameters()).device)


def _overall_last(groups: dict) -> list[str]:
    return sorted(name for name in groups if name != "overall") + ["overall"]


def _bar(config: EvalConfig, name: str) -> str | None:
    return name if config.progress else None


def stereoset_outcomes(
    model, tokenizer, clusters: list[StereoSetCluster], config: EvalConfig
) -> list[tuple[StereoSetCluster, ClusterOutcome]]:
    """Score the three candidates of every cluster (mean per-token log-prob) and count them."""
    pairs = [cluster.scoring_pair(label) for cluster in clusters for label in LABELS]
    n = len(LABELS)
    groups = [list(range(i, i + n)) for i in range(0, len(pairs), n)] if config.share_prefix else None
    scores = score_pairs(
        model,
        tokenizer,
        pairs,
        batch_size=max(1, config.batch_size // n) if groups else config.batch_size,
        dtype=compute_dtype(model, config),
        start_token=config.start_token,
        progress=_bar(config, "stereoset"),
        groups=groups,
    ).logp_mean.view(len(clusters), len(LABELS))
    return [
        (cluster, cluster_outcome(cluster.target, *row.tolist())) for cluster, row in zip(clusters, scores)
    ]


def run_stereoset(model, tokenizer, config: EvalConfig) -> dict:
    """SS, LMS, ICAT per bias type for intrasentence, intersentence and overall (DESIGN.md §3)."""
    clusters = select_split(load_stereoset(config.stereoset), config.split, config.split_seed)
    clusters = clusters[: config.limit] if config.limit else clusters
    scored = stereoset_outcomes(model, tokenizer, clusters, config)
    report: dict[str, dict] = {}
    for task in ("intrasentence", "intersentence", "overall"):
        chosen = [(c, o) for c, o in scored if task == "overall" or c.task == task]
        if not chosen:
            continue
        groups = {"overall": [o for _, o in chosen]}
        for cluster, outcome in chosen:
            groups.setdefault(cluster.bias_type, []).append(outcome)
        report[task] = {name: stereoset_score(groups[name]).to_dict() for name in _overall_last(groups)}
    return {"split": config.split, "split_seed": config.split_seed, "scores": report,
            "per_target": per_target_counts(scored)}


def per_target_counts(scored: list[tuple[StereoSetCluster, ClusterOutcome]]) -> dict[str, dict[str, list[int]]]:
    """``{task: {target: [n_clusters, n_pro_stereotype, n_related]}}`` for intra, inter and overall.

    The units of the bootstrap intervals (:mod:`amendlm.bias.bootstrap`): SS_t = 100·pro/n,
    LMS_t = 100·related/(2n).
    """
    counts: dict[str, dict[str, list[int]]] = {}
    for cluster, outcome in scored:
        for task in (cluster.task, "overall"):
            row = counts.setdefault(task, {}).setdefault(outcome.target, [0, 0, 0])
            row[0] += 1
            row[1] += outcome.pro_stereotype
            row[2] += outcome.related
    return {task: dict(sorted(rows.items())) for task, rows in counts.items()}


def run_crows_pairs(model, tokenizer, config: EvalConfig) -> dict:
    """CrowS-Pairs metric per bias type and overall (summed log-prob sentence score)."""
    pairs = load_crows_pairs(config.crows_pairs)
    pairs = pairs[: config.limit] if config.limit else pairs
    texts = [("", p.sent_more) for p in pairs] + [("", p.sent_less) for p in pairs]
    scores = score_pairs(
        model,
        tokenizer,
        texts,
        batch_size=config.batch_size,
        dtype=compute_dtype(model, config),
        start_token=config.start_token,
        progress=_bar(config, "crows-pairs"),
    ).logp_sum.tolist()
    more, less = scores[: len(pairs)], scores[len(pairs) :]
    groups: dict[str, list[int]] = {"overall": list(range(len(pairs)))}
    for index, pair in enumerate(pairs):
        groups.setdefault(pair.bias_type, []).append(index)
    return {
        "scores": {
            name: crows_score([more[i] for i in idx], [less[i] for i in idx], [pairs[i].direction for i in idx]).to_dict()
            for name, idx in ((name, groups[name]) for name in _overall_last(groups))
        },
        # per pair, in data order: the unit of the bootstrap interval (amendlm.bias.bootstrap)
        "per_pair": {"more_higher": [int(m > l) for m, l in zip(more, less)],
                     "bias_type": [p.bias_type for p in pairs]},
    }


def perplexity_windows(token_ids: list[int], start_id: int, window: int, stride: int) -> list[EncodedPair]:
    """Strided windows over one token stream; each token is scored exactly once.

    The first window is ``[start] + tokens[:window - 1]`` (all scored); each later window covers
    ``window`` tokens ending ``stride`` tokens further and scores only its last, new tokens, so
    every scored token sees at least ``window - stride`` tokens of context.

    Raises:
        ValueError: not ``0 < stride < window``.
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride {stride}, window {window}")
    first = token_ids[: window - 1]
    windows = [EncodedPair([start_id, *first], len(first))]
    scored_until = len(first)
    while scored_until < len(token_ids):
        end = min(scored_until + stride, len(token_ids))
        begin = max(0, end - window)
        windows.append(EncodedPair(token_ids[begin:end], end - scored_until))
        scored_until = end
    return windows


def run_perplexity(model, tokenizer, config: EvalConfig) -> dict:
    """exp(mean token NLL) over the WikiText sample joined by newlines, strided windows."""
    texts = load_texts(config.wikitext)
    texts = texts[: config.limit] if config.limit else texts
    token_ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    if not token_ids:
        raise DataError(f"{resolve_dataset(config.wikitext)}: no text to compute perplexity on")
    start = start_token_id(tokenizer, config.start_token)
    windows = perplexity_windows(token_ids, start, config.ppl_window, config.ppl_stride)
    pad_id = pad_token_id(tokenizer, config.start_token)
    scores = score_encoded(
        model, windows, pad_id, max(1, config.batch_size // 8), compute_dtype(model, config),
        progress=_bar(config, "perplexity"),
    )
    n_tokens = int(scores.n_tokens.sum())
    nll = -float(scores.logp_sum.sum()) / n_tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "n_tokens": n_tokens, "window": config.ppl_window, "stride": config.ppl_stride}


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: its runner and the :class:`EvalConfig` field naming its data."""

    run: Callable[..., dict]
    data_field: str


BENCHMARKS: dict[str, Benchmark] = {
    "stereoset": Benchmark(run_stereoset, "stereoset"),
    "crows-pairs": Benchmark(run_crows_pairs, "crows_pairs"),
    "perplexity": Benchmark(run_perplexity, "wikitext"),
}


def evaluate(model, tokenizer, config: EvalConfig) -> dict:
    """Run ``config.benchmarks`` and return results as data (plus the seconds each took).

    ``model`` is a causal LM or a proposal x aligner pair (:class:`amendlm.product.ProductLM`:
    every benchmark scores the pair's ``mds`` distribution ``softmax(b/T_b + a/T_e)``).
    ``config.dtype`` ``auto`` is resolved once for the model's device; ``results["config"]`` records
    the resolved dtype (``bf16``/``fp32``) and ``dtype_auto`` (whether ``auto`` chose it).
    ``results["weights"]`` identifies the (proposal's) weights scored
    (:func:`amendlm.provenance.weights_record`: SHA-256 of the model's and the adapter's files);
    ``results["aligner"]`` is None, or for a pair :func:`amendlm.product.aligner_record` (the
    aligner's name, path, weights record and both temperatures).  The model runs in eval mode
    (dropout off) and gets its own train/eval modes back afterwards (:func:`amendlm.modeling.eval_mode`).
    """
    requested = config.dtype
    dtype = compute_dtype(model, config)
    config = replace(config, dtype=dtype_name(dtype))
    start_id = start_token_id(tokenizer, config.start_token)
    pair = isinstance(model, ProductLM)
    results: dict = {
        "config": {**asdict(config), **dtype_record(requested, dtype)},
        "start_token": {"id": start_id, "token": tokenizer.convert_ids_to_tokens(start_id)},
        "weights": weights_record(model.proposal if pair else model),
        "aligner": aligner_record(model) if pair else None,
        "benchmarks": {},
    }
    for name in config.benchmarks:
        benchmark = BENCHMARKS[name]
        began = time.perf_counter()
        with torch.inference_mode(), eval_mode(model):
            result = benchmark.run(model, tokenizer, config)
        result["seconds"] = time.perf_counter() - began
        data_file = resolve_dataset(getattr(config, benchmark.data_field))
        result["data_file"] = str(data_file)
        result["data_sha256"] = file_sha256(data_file)
        results["benchmarks"][name] = result
    return results


def evaluate_model(model: str, config: EvalConfig, adapter: str | Path | None = None, device: str = "cpu",
                   trust_remote_code: bool = False, aligner: AlignerConfig | None = None) -> dict:
    """Validate the data, load ``model`` (+ ``adapter``) and :func:`evaluate` it: what ``amendlm eval`` writes.

    With ``aligner``, the scored model is the pair ``model`` (+ ``adapter``: the adapter applies to
    the proposal) x ``aligner.aligner`` (:func:`amendlm.product.load_product`).

    Returns the :func:`evaluate` dict plus ``model``, ``model_path``, ``adapter`` (the proposal's),
    ``device``, ``versions`` and ``seconds_total`` (wall-clock seconds, loading included).

    Raises:
        FileNotFoundError, DataError: a bad data path or row, or a missing local aligner path
            (before any model is loaded).
        ValueError, OSError: as :func:`amendlm.modeling.load_model` (unknown model, misfit adapter);
            an aligner whose tokenizer differs from the model's.
    """
    from amendlm.modeling import load_model
    from amendlm.report import package_versions

    began = time.perf_counter()
    check_data(config)  # fail on a bad path or row before loading the model
    if aligner is not None:
        check_aligner(aligner)
    loaded, tokenizer = load_model(model, adapter=adapter, device=device, trust_remote_code=trust_remote_code)
    proposal = loaded
    if aligner is not None:
        loaded = load_product(proposal, tokenizer, aligner, proposal_name=model, device=device,
                              trust_remote_code=trust_remote_code)
    results = evaluate(loaded, tokenizer, config)
    results.update(
        model=model,
        model_path=str(getattr(proposal, "name_or_path", model)),
        adapter=str(adapter) if adapter else None,
        device=device,
        versions=package_versions(),
        seconds_total=time.perf_counter() - began,
    )
    return results
