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



def ss_targets_missed(checks: dict[str, list[dict]]) -> bool:
    """Whether a run missed an SS target (overall SS, every type's SS, no type below 46): ``checks`` maps a
    label to its :func:`amendlm.bias.compare.check_targets` dicts (``name``, ``passed``)."""
    from amendlm.bias.compare import TARGET_NAMES

    ss_name, types_name, _, _, _, lowest_name = TARGET_NAMES
    return any(c["passed"] is False and c["name"] in (ss_name, types_name, lowest_name)
               for run in checks.values() for c in run)


def recorded_max_lms_drop(train_config: dict) -> float:
    """The LMS allowance of a RAM run's val selection, read from its recorded ``train_config.json``
    (``pairs.max_lms_drop``); :class:`amendlm.ram.preference.PairsConfig`'s default where it is not recorded."""
    from amendlm.ram.preference import PairsConfig

    value = (train_config.get("pairs") or {}).get("max_lms_drop")
    return PairsConfig.max_lms_drop if value is None else float(value)


def _not_kept(close: dict, at: dict | None, max_lms_drop: float) -> str:
    """Why the selection rule (smallest worst-type gap among evaluations whose LMS drop is at most
    ``max_lms_drop``; the first on a tie) did not keep the val evaluation ``close`` but ``at``."""
    reasons = []
    if close["lms_drop"] > max_lms_drop:
        reasons.append(f"its LMS drop {close['lms_drop']:.2f} exceeded the {max_lms_drop:g}-point allowance")
    if at is not None and close["worst_gap"] > at["worst_gap"]:
        reasons.append("a bias type's gap was larger there")
    if not reasons:
        reasons.append("an earlier evaluation with the same worst-type gap was kept" if at is not None
                       else "no evaluation was kept")
    return " and ".join(reasons)


def why_missed(trajectories: dict[str, list[dict]], kept: dict[str, int | None], max_lms_drop: dict[str, float],
               test_ss: dict[str, float], base_ss: tuple[float, float], test_types: dict[str, tuple[int, int]]) -> str:
    """Why the SS targets are missed, in sentences read from the data: per RAM run, the kept val evaluation (its
    overall and worst-type val SS, types below 46, and the test SS of the kept aligner) and the val evaluation
    closest to SS 50 (whether it was within 50 ± 2 and why the rule did not keep it: its LMS drop exceeded the
    allowance, a bias type's gap was larger there than at the kept one, or both); the val-to-test shift of the
    model alone; the size of the smallest test type.

    Args:
        trajectories: label -> ``"val"`` records (``step``, ``ss`` per type incl. ``overall``, ``lms_drop``).
        kept: label -> the kept step.
        max_lms_drop: label -> the run's selection rule LMS allowance (points).
        test_ss: label -> the kept aligner's overall test SS.
        base_ss: the model alone's overall ``(val SS at step 0, test SS)``.
        test_types: bias type -> ``(target terms, clusters)`` on test.

    Returns:
        markdown (empty when there are no runs).
    """
    parts = []
    for label, records in trajectories.items():
        if not records:
            continue
        close = min(records, key=lambda r: (abs(r["ss"]["overall"] - 50), r["step"]))
        at = next((r for r in records if r["step"] == kept.get(label)), None)
        text = f"{label}: "
        if at is not None:
            types = {k: v for k, v in at["ss"].items() if k != "overall"}
            worst = max(types, key=lambda k: abs(types[k] - 50))
            below = [f"{k} {v:.1f}" for k, v in types.items() if v < 46]
            text += (f"kept step {at['step']}, val SS {at['ss']['overall']:.2f} with {worst} at {types[worst]:.1f}"
                     + (f" (below 46: {', '.join(below)})" if below else "")
                     + (f", test SS {test_ss[label]:.2f}" if label in test_ss else "") + "; ")
        within = abs(close["ss"]["overall"] - 50) <= 2
        text += (f"val SS closest to 50: {close['ss']['overall']:.2f} at step {close['step']}"
                 + (" (within 50 ± 2" + (f", not kept: {_not_kept(close, at, max_lms_drop[label])})" if close is not at else ")")
                    if within else " (outside 50 ± 2)"))
        parts.append(text)
    if not parts:
        return ""
    allowances = {max_lms_drop[label] for label, records in trajectories.items() if records}
    allowance = (f"within {allowances.pop():g} LMS points of step 0" if len(allowances) == 1 else
                 "within the run's LMS allowance of step 0 (" + ", ".join(
                     f"{label} {max_lms_drop[label]:g} points" for label, records in trajectories.items() if records) + ")")
    out = ("Why the SS targets are missed: the aligner kept is the val evaluation with the smallest worst-type "
           f"|SS − 50| among those {allowance} (the rule does not look at overall SS). "
           + "; ".join(parts) + ".  "
           f"Val and test target terms differ: the model alone scores SS {base_ss[0]:.2f} on val and {base_ss[1]:.2f} on test.")
    if test_types:
        small = min(test_types, key=lambda t: test_types[t][1])
        terms, clusters = test_types[small]
        out += (f"  The smallest test type, {small}, has {terms} target term{'s' if terms != 1 else ''} and {clusters} "
                "clusters" + (f", so one cluster moves its SS by {100 / clusters:.1f} points." if terms == 1 else "."))
    return out
