"""The parts of ``ram_debias.py`` that are not the pipeline: inference cost, the generation check, the tables.

* :func:`measure_cost`: seconds to score the same StereoSet test clusters with the proposal alone and with
  each pair (one process, interleaved, the best of ``repeats``), and each aligner's parameters; the
  trainable parameters of the BiasUnlearn adapter (its LoRA attached to a fresh copy, counted);
* :func:`generate_check`: seeded continuations of a few test contexts from the proposal alone and the
  pair (``par-kl`` and ``mds``), with how often ``par-kl`` fell back to the proposal;
* :func:`cost_table`, :func:`val_table`, :func:`generation_markdown`: markdown from those results.
"""

from __future__ import annotations

import time

from common import markdown_table
from eval_common import seconds_cell
from targets_common import ss_targets_missed, why_missed  # noqa: F401  (ram_debias imports them from here)

GENERATION_MODES = ("proposal", "par-kl", "mds")
FULL_DISTRIBUTION = 1.0  # proposal_top_p of the proposal-alone and mds draws


def generation_contexts(n_per_type: int = 1, seed: int = 0) -> list[dict]:
    """A few StereoSet **test** contexts: per bias type, ``n_per_type`` intrasentence prefixes (the text before
    BLANK) and as many intersentence contexts, the first by a seeded hash of the cluster id."""
    import zlib

    from amendlm.data.splits import select_split
    from amendlm.data.stereoset import load_stereoset

    clusters = sorted(select_split(load_stereoset("stereoset"), "test"), key=lambda c: zlib.crc32(f"{seed}:{c.id}".encode()))
    chosen: list[dict] = []
    for bias_type in sorted({c.bias_type for c in clusters}):
        for task in ("intrasentence", "intersentence"):
            picked = [c for c in clusters if c.bias_type == bias_type and c.task == task][:n_per_type]
            for c in picked:
                text = c.context.split("BLANK", 1)[0].rstrip() if task == "intrasentence" else c.context
                chosen.append({"id": c.id, "bias_type": bias_type, "task": task, "target": c.target, "prompt": text})
    return chosen


def measure_cost(model: str, aligners: dict[str, str], n_clusters: int, repeats: int, dtype: str, lora_config) -> dict:
    """Scoring seconds of the proposal alone and of each pair on the same ``n_clusters`` test clusters.

    Returns:
        ``{"n_clusters", "repeats", "dtype", "proposal_seconds", "pairs": {row: {"seconds", "ratio",
        "aligner_parameters", "parameter_ratio"}}, "proposal_parameters", "biasunlearn_trainable"}``:
        seconds are the best of ``repeats`` (each pair timed right after the proposal alone); ``ratio``
        = pair / proposal seconds; ``biasunlearn_trainable``: the parameters of the adapter
        ``lora_config`` (an ``UnlearnConfig``) attaches.
    """
    import torch

    from amendlm.bias.evaluate import EvalConfig, stereoset_outcomes
    from amendlm.data.splits import select_split
    from amendlm.data.stereoset import load_stereoset
    from amendlm.modeling import load_model
    from amendlm.product import AlignerConfig, load_product
    from amendlm.unlearn.models import attach_lora

    proposal, tokenizer = load_model(model)
    clusters = select_split(load_stereoset("stereoset"), "test")[:n_clusters]
    config = EvalConfig(benchmarks=["stereoset"], split="test", dtype=dtype, progress=False)

    def seconds(scored) -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            stereoset_outcomes(scored, tokenizer, clusters, config)
        return time.perf_counter() - began

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    seconds(proposal)  # warm-up
    result = {"n_clusters": len(clusters), "repeats": repeats, "dtype": dtype, "pairs": {},
              "proposal_parameters": count(proposal)}
    best_alone = float("inf")
    for row, path in aligners.items():
        pair = load_product(proposal, tokenizer, AlignerConfig(path), proposal_name=model)
        alone, together = float("inf"), float("inf")
        for _ in range(repeats):
            alone = min(alone, seconds(proposal))
            together = min(together, seconds(pair))
        best_alone = min(best_alone, alone)
        result["pairs"][row] = {"seconds": together, "proposal_seconds": alone, "ratio": together / alone,
                                "aligner_parameters": count(pair.aligner),
                                "parameter_ratio": (count(proposal) + count(pair.aligner)) / count(proposal)}
    result["proposal_seconds"] = best_alone if aligners else None
    fresh, _ = load_model(model)
    adapted = attach_lora(fresh, lora_config)
    result["biasunlearn_trainable"] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    return result


def generate_check(model: str, aligner: str, contexts: list[dict], max_new_tokens: int, seed: int) -> dict:
    """Seeded continuations (T 1) of ``contexts`` from the proposal alone and from the pair, per mode of
    :data:`GENERATION_MODES`; raw text prompts (``[start] + tokens``, no chat template), no stop string.
    ``proposal`` and ``mds`` draw from their full distributions (no nucleus: the distributions the
    benchmarks score, so a pair that is the proposal draws the proposal's tokens); ``par-kl`` keeps its
    public-code nucleus (proposal top-p 0.95, aligner top-p 0.9, KL threshold 0.1).

    Returns:
        ``{"modes": {mode: {"texts": [...], "fallback_rate", "follows_aligner_argmax", "follows_proposal_argmax"}},
        "contexts", "max_new_tokens", "seed"}``.
    """
    from amendlm.ram.api import ResidualAlignedLM
    from amendlm.ram.data import encode_prompt
    from amendlm.ram.generate import GenerateConfig, GenerationStats

    ram = ResidualAlignedLM.from_pretrained(model, aligner)
    ids = [encode_prompt(ram.tokenizer, c["prompt"], chat_template=False) for c in contexts]
    config = GenerateConfig(max_new_tokens=max_new_tokens, greedy=False, seed=seed, batch_size=len(ids))
    modes = {}
    for mode in GENERATION_MODES:
        stats = GenerationStats()
        full = {} if mode == "par-kl" else {"proposal_top_p": FULL_DISTRIBUTION}
        generations = ram.generate_ids(ids, mode=mode, config=config, stats=stats, **full)
        rates = stats.choices.rates()
        modes[mode] = {"texts": [g.text for g in generations],
                       **{k: rates[k] for k in ("fallback_rate", "follows_aligner_argmax", "follows_proposal_argmax")}}
    return {"modes": modes, "contexts": contexts, "max_new_tokens": max_new_tokens, "seed": seed}


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def generation_markdown(check: dict, label: str) -> str:
    """The continuations as a markdown table (one row per context), and the rules' choice shares."""
    modes = check["modes"]
    rows = []
    for index, context in enumerate(check["contexts"]):
        cells = [f"{context['bias_type']} ({context['task'][:5]})", f"`{context['prompt']}`"]
        cells += [f"`{' '.join((modes[m]['texts'][index] or '').split())}`".replace("|", "\\|") for m in GENERATION_MODES]
        rows.append(cells)
    header = ["type", "context", "proposal alone", f"{label} `par-kl`", f"{label} `mds`"]
    shares = "; ".join(f"`{m}`: {_share(modes[m]['follows_proposal_argmax'])} of the tokens were the proposal's argmax"
                       + (f", fell back to the proposal at {_share(modes[m]['fallback_rate'])} of the steps"
                          if modes[m]["fallback_rate"] is not None else "") for m in GENERATION_MODES)
    text = markdown_table(header, rows, "lllll") + f"\n\n{shares}."
    fallback = modes.get("par-kl", {}).get("fallback_rate")
    if fallback is not None and fallback >= 0.95:
        text += (f"  `par-kl` fell back at {_share(fallback)} of the steps, so its column is the model's own nucleus "
                 "sample (its differences from the model alone come from the top-p cut, not from the aligner).")
    return text


def cost_table(rows: dict[str, dict]) -> str:
    """``{label: {"trainable", "train_seconds", "train_seconds_lower_bound", "cost", "cost_params", "kept"}}`` as
    markdown (``train_seconds_lower_bound``, from :func:`eval_common.training_seconds`, marks the seconds ≥)."""
    def fmt(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    table = [[label, fmt(r["trainable"], "{:,}"), seconds_cell(r["train_seconds"], r.get("train_seconds_lower_bound", False)),
              r["cost"], r["cost_params"], r["kept"]] for label, r in rows.items()]
    return markdown_table(["run", "trainable parameters", "training s", "inference cost (× proposal, measured)",
                           "parameters, model + aligner (× model)", "kept (val)"], table, "lrrrrl")


def val_table(trajectories: dict[str, list[dict]], kept: dict[str, int | None]) -> str:
    """The val evaluations of each RAM run: step, val SS, LMS, worst per-type gap, LMS drop, whether it is the kept one."""
    rows = [[label, r["step"], r["ss"]["overall"], r["lms"]["overall"], r["worst_gap"], r["lms_drop"],
             "**kept**" if r["step"] == kept.get(label) else ""]
            for label, records in trajectories.items() for r in records]
    return markdown_table(["run", "step", "val SS", "val LMS", "worst type |SS−50|", "LMS drop", "kept"], rows, "lrrrrrl")



def recorded_max_lms_drop(train_config: dict) -> float:
    """The LMS allowance of a RAM run's val selection, read from its recorded ``train_config.json``
    (``pairs.max_lms_drop``); :class:`amendlm.ram.preference.PairsConfig`'s default where it is not recorded."""
    from amendlm.ram.preference import PairsConfig

    value = (train_config.get("pairs") or {}).get("max_lms_drop")
    return PairsConfig.max_lms_drop if value is None else float(value)
