"""The RAM XSum table as data: seeds averaged, paired-bootstrap intervals, targets, tables, the loss plot.

Pure functions over ``align eval`` results (:func:`amendlm.ram.evaluate.evaluate_systems`), so the
numbers of ``experiments/ram_xsum.py`` are tested without a model:

* :func:`mean_over_seeds`: one system's sampled runs (same prompts) -> their mean, per prompt too;
* :func:`paired_intervals`: each system's ROUGE-L minus a baseline's, paired over prompts, with a 95 %
  percentile-bootstrap interval (:func:`amendlm.bias.bootstrap.paired_difference`: 2,000 draws of the
  prompts, the same draws for both systems);
* :func:`seed_rows`: every system's row of one decoding and split from its recorded evaluations;
* :func:`best_ram_mode`: the RAM mode (or a variant, e.g. `mds` at another aligner temperature) with the best
  ROUGE-L on the **val** prompts (the training prompts ``align train`` held out), never on test;
* :func:`target_rows`: the table's targets read against that mode's test row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from amendlm.bias.bootstrap import paired_difference
from amendlm.ram import run_dir
from amendlm.report import atomic_save_figure
from common import markdown_table

RAM_MODES = ("par", "par-kl", "sir", "mds")
FINETUNES = ("sft-lora", "sft-full")
SYSTEMS = ("proposal", "aligner", *RAM_MODES, *FINETUNES)
BASELINES = ("proposal", "aligner", *FINETUNES)  # ROUGE-L differences are taken against each
# the targets (ROUGE-L points) the table is read against: best RAM mode minus ...
TARGET_OVER_ALIGNER = 1.5  # ... the small aligner alone, with its interval above 0
TARGET_OVER_PROPOSAL = 2.0  # ... the proposal alone
TARGET_UNDER_FINETUNE = 1.0  # ... a direct fine-tune of the proposal: at least minus this
FALLBACK_IS_PROPOSAL = 0.9  # a mode that left this share of its tokens to the proposal is nearly the proposal
SCALARS = ("rouge1", "rouge2", "rougeL", "mean_words", "eos_share")
CHOICES = ("fallback_rate", "follows_aligner_argmax", "follows_proposal_argmax")


def system_row(metrics: dict, n_prompts: int) -> dict:
    """The fields of one system's ``align eval`` metrics the table uses, with ``eos_share`` (rows ended by EOS / prompts)."""
    row = {name: metrics[name] for name in ("rouge1", "rouge2", "rougeL", "mean_words")}
    row["eos_share"] = metrics["finish_reasons"]["eos"] / n_prompts
    row.update({name: metrics["choices"][name] for name in CHOICES})
    row["per_prompt_rougeL"] = list(metrics["per_prompt_rougeL"])
    return row


def mean_over_seeds(runs: list[dict]) -> dict:
    """The mean of one system's rows (:func:`system_row`) over seeds: each scalar, each choice share
    (``None`` stays ``None``) and each prompt's ROUGE-L (the unit of the paired bootstrap).

    Raises:
        ValueError: no runs, or runs over different numbers of prompts.
    """
    if not runs:
        raise ValueError("mean_over_seeds: no runs")
    lengths = {len(r["per_prompt_rougeL"]) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"mean_over_seeds: runs over different numbers of prompts {sorted(lengths)}")
    out = {name: sum(r[name] for r in runs) / len(runs) for name in SCALARS}
    for name in CHOICES:
        values = [r[name] for r in runs if r[name] is not None]
        out[name] = sum(values) / len(values) if values else None
    out["per_prompt_rougeL"] = [sum(values) / len(runs) for values in zip(*(r["per_prompt_rougeL"] for r in runs))]
    out["seeds"] = len(runs)
    return out


def paired_intervals(rows: dict[str, dict], baselines=BASELINES) -> dict[str, dict[str, dict | None]]:
    """``{system: {baseline: {value, low, high, p, n_units}}}``: mean per-prompt ROUGE-L of ``system`` minus
    ``baseline`` with its 95 % paired-bootstrap interval; ``None`` for a system against itself or a
    baseline that is not in ``rows``.

    Raises:
        ValueError: two systems scored on different numbers of prompts.
    """
    out: dict[str, dict[str, dict | None]] = {}
    for system, row in rows.items():
        out[system] = {}
        for baseline in baselines:
            if baseline == system or baseline not in rows:
                out[system][baseline] = None
                continue
            diff = paired_difference(rows[baseline]["per_prompt_rougeL"], row["per_prompt_rougeL"])
            out[system][baseline] = diff.to_dict()
    return out


def seed_rows(found: dict[str, dict[int, dict | None]], where: Callable[[str, int], str] | None = None
              ) -> tuple[dict[str, dict], int | None, list[str]]:
    """Every system's row (:func:`system_row`, averaged over seeds by :func:`mean_over_seeds`) of one decoding
    and split, from ``{group: {seed: align eval results, or None when not recorded}}``; ``where(group, seed)``
    names an evaluation in the error (e.g. its file; default ``"GROUP seed N"``).

    Returns:
        ``(rows, n_prompts, skipped)``: the rows in :data:`SYSTEMS` order (a ``finetuned`` system is named
        after its group), the number of prompts (None when no group is complete), and the groups left out
        because an evaluation of theirs is missing for some seed.

    Raises:
        ValueError: the evaluations were made over different numbers of prompts (names each with its number).
    """
    per_seed: dict[str, list[dict]] = {}
    n_prompts, skipped, named = set(), [], []
    for group, by_seed in found.items():
        if any(data is None for data in by_seed.values()):
            skipped.append(group)
            continue
        for seed, data in by_seed.items():
            n_prompts.add(data["n_prompts"])
            named.append(f"{where(group, seed) if where else f'{group} seed {seed}'} {data['n_prompts']}")
            for system, metrics in data["systems"].items():
                per_seed.setdefault(group if system == "finetuned" else system, []).append(system_row(metrics, data["n_prompts"]))
    if len(n_prompts) > 1:
        raise ValueError(f"evaluations over different numbers of prompts: {', '.join(named)}")
    rows = {s: mean_over_seeds(per_seed[s]) for s in SYSTEMS if s in per_seed}
    return rows, (n_prompts.pop() if n_prompts else None), skipped


def best_ram_mode(val_rows: dict[str, dict] | None, candidates: tuple[str, ...] = RAM_MODES) -> str | None:
    """The RAM mode with the highest mean ROUGE-L on the val prompts (the first in ``candidates`` order on a
    tie), or None when the val rows are not there (the val step has not run) or hold no candidate.

    Args:
        val_rows: the rows of the val split (:func:`seed_rows`), never the test rows the targets are read on.
        candidates: the systems to choose among: :data:`RAM_MODES`, and a variant such as `mds` at another
            aligner temperature (``ram_xsum_common.ram_candidates``).
    """
    modes = [m for m in candidates if m in (val_rows or {})]
    return max(modes, key=lambda m: (val_rows[m]["rougeL"], -modes.index(m))) if modes else None


def target_rows(rows: dict[str, dict], intervals: dict[str, dict], mode: str | None) -> list[dict]:
    """The targets, each read on the test rows of ``mode``, the RAM mode chosen on val (:func:`best_ram_mode`;
    None: not chosen yet, no target is read):

    * best RAM − aligner alone ≥ :data:`TARGET_OVER_ALIGNER` with the interval's low end above 0;
    * best RAM − proposal ≥ :data:`TARGET_OVER_PROPOSAL`;
    * best RAM − each direct fine-tune ≥ −:data:`TARGET_UNDER_FINETUNE`.

    Returns:
        rows ``{"against", "mode", "difference", "low", "high", "target", "met", "fallback_rate"}`` for the
        baselines present (``fallback_rate``: the mode's share of tokens left to the proposal, None but for
        ``par-kl``).
    """
    if mode is None or mode not in rows:
        return []
    wanted = [("aligner", TARGET_OVER_ALIGNER, True), ("proposal", TARGET_OVER_PROPOSAL, False)]
    wanted += [(f, -TARGET_UNDER_FINETUNE, False) for f in FINETUNES]
    out = []
    fallback = rows[mode].get("fallback_rate")  # par-kl: the share of tokens it left to the proposal
    for baseline, target, needs_interval in wanted:
        diff = intervals[mode].get(baseline)
        if diff is None:
            continue
        met = diff["value"] >= target and (diff["low"] > 0 if needs_interval else True)
        out.append({"against": baseline, "mode": mode, "difference": diff["value"], "low": diff["low"],
                    "high": diff["high"], "target": target, "interval_above_zero": needs_interval, "met": met,
                    "fallback_rate": fallback})
    return out


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _diff(interval: dict | None) -> str:
    return "" if interval is None else f"{interval['value']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def systems_table(rows: dict[str, dict], intervals: dict[str, dict], labels: dict[str, str]) -> str:
    """The systems as a markdown table: ROUGE, differences with intervals, length, EOS, what tokens followed."""
    header = ["system", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ROUGE-L − proposal [95 % CI]", "− aligner alone [95 % CI]",
              "words", "ended by EOS", "par-kl fallback", "= aligner argmax", "= proposal argmax"]
    table = [[labels.get(s, s), f"{r['rouge1']:.2f}", f"{r['rouge2']:.2f}", f"{r['rougeL']:.2f}",
              _diff(intervals[s].get("proposal")), _diff(intervals[s].get("aligner")), f"{r['mean_words']:.1f}",
              _share(r["eos_share"]), _share(r["fallback_rate"]), _share(r["follows_aligner_argmax"]),
              _share(r["follows_proposal_argmax"])] for s, r in rows.items()]
    return markdown_table(header, table, "l" + "r" * (len(header) - 1))


def _verdict(target: dict) -> str:
    """"met", "missed", or, when the mode fell back to the proposal for >= 90 % of its tokens, "met only
    through the proposal (falls back N %)": the mode is then nearly the proposal itself."""
    if not target["met"]:
        return "missed"
    fallback = target.get("fallback_rate")
    if fallback is not None and fallback >= FALLBACK_IS_PROPOSAL:
        return f"met only through the proposal (falls back {100 * fallback:.0f} %)"
    return "met"


def targets_table(targets: list[dict], labels: dict[str, str]) -> str:
    """The targets as a markdown table (difference with its interval, the target, met or missed)."""
    rows = [[f"best RAM mode (`{t['mode']}`) − {labels.get(t['against'], t['against'])}",
             f"{t['difference']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}]",
             f"≥ {t['target']:+g}" + (", interval above 0" if t["interval_above_zero"] else ""),
             _verdict(t)] for t in targets]
    return markdown_table(["target (ROUGE-L)", "difference [95 % CI]", "target", ""], rows, "lrll")


def val_table(val_rows: dict[str, dict], mode: str, labels: dict[str, str], best_te: str | None = None) -> str:
    """The ROUGE-L of the proposal, the aligner, each RAM mode and any other row (e.g. `mds` at another aligner
    temperature) on the val prompts, the chosen mode marked (and ``best_te``, the `mds` row of the best T_e)."""
    shown = [s for s in ("proposal", "aligner", *RAM_MODES) if s in val_rows] + [s for s in val_rows if s not in SYSTEMS]
    marks = {s: "; ".join(m for m, on in (("best RAM mode", s == mode), ("best `mds` T_e", s == best_te)) if on)
             for s in shown}
    table = [[labels.get(s, s), f"{val_rows[s]['rougeL']:.2f}", marks[s]] for s in shown]
    return markdown_table(["system", "ROUGE-L on val", "chosen on val"], table, "lrl")


def mode_choice(val_rows: dict[str, dict], mode: str | None, n_val: int | None, labels: dict[str, str],
                steps: str | list[str], test_rows: dict[str, dict] = (), best_te: str | None = None) -> str:
    """How the best RAM mode was chosen, in words and a :func:`val_table`; or, when a val step of ``steps`` is
    not done, that it is not chosen yet and the targets are pending (never chosen on test, nor on part of the
    val steps, instead).  ``test_rows``: the test table's rows (the targets are pending while the chosen
    mode's is missing); ``best_te``: marked in the val table."""
    if mode is None:
        steps = [steps] if isinstance(steps, str) else steps
        which = (f"the val step (`{steps[0]}`) is" if len(steps) == 1 else
                 "the val steps (" + ", ".join(f"`{s}`" for s in steps) + ") are")
        return (f"Best RAM mode: not chosen yet, {which} not done; the targets are pending "
                "(the mode is chosen on val prompts only, never on the test prompts).")
    read = ("the targets below read its test row" if mode in test_rows
            else "its test row is not evaluated yet, so the targets are pending")
    return (f"Best RAM mode, chosen by ROUGE-L on the {n_val} val prompts (training prompts held out of the small "
            f"aligner's training; never on test): `{mode}`; {read}.\n\n"
            + val_table(val_rows, mode, labels, best_te))


def headline_row(targets: list[dict], rows: dict[str, dict], skipped: list[str], layers: int,
                 mode: str | None = None, why: str | None = None) -> tuple[str, str]:
    """The README headline of the greedy table: the best mode (chosen on val) minus the aligner alone, the
    proposal and the full fine-tune, with intervals; "pending" when the mode is not chosen yet (``mode`` None;
    ``why``: the reason, default "the val step has not run") or its test row is not evaluated yet."""
    what = f"RAM with an aligner of {layers} blocks on XSum (greedy, best mode on val"
    if not targets:
        reason = ((why or "the val step has not run") if mode is None
                  else f"the test row of the chosen mode `{mode}` is not evaluated yet")
        return f"{what}): ROUGE-L − aligner alone / − proposal / − full SFT", f"pending: {reason}"
    by = {t["against"]: t for t in targets}
    present = [b for b in ("aligner", "proposal", "sft-full") if b in by]
    names = {"aligner": "aligner alone", "proposal": "proposal", "sft-full": "full SFT"}
    mode = targets[0]["mode"]
    return (f"{what} `{mode}`{fallback_caveat(rows, mode)}): ROUGE-L − " + " / − ".join(names[b] for b in present)
            + (" (partial: " + ", ".join(skipped) + " not evaluated yet)" if skipped else ""),
            " / ".join(f"{by[b]['difference']:+.2f} [{by[b]['low']:+.2f}, {by[b]['high']:+.2f}]" for b in present))


def plot_training(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """Held-out −log Q(y|x) per epoch of each training (the same held-out prompts), the training loss per
    logged step of each, and the warm-up's KL per step (if any).  ``logs``: name -> log records
    (``event`` ``heldout`` / ``train`` / ``distill``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(logs.values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, log in logs.items():
        for ax, event, x, y in ((axes[0], "heldout", "epoch", "nll"), (axes[1], "train", "step", "loss"),
                                (axes[2], "distill", "step", "kl")):
            records = [r for r in log if r.get("event") == event]
            if records:
                ax.plot([r[x] for r in records], [r[y] for r in records], marker="o", markersize=3, label=name)
    axes[0].set(xlabel="epoch", title="held-out −log Q(y|x) (nats per summary)")
    axes[1].set(xlabel="optimizer step (logged)", title="training loss (per batch)")
    axes[2].set(xlabel="step", title="warm-up: KL(P_M ‖ Q) per token (nats)")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return path


# Training fields added after results were recorded, with the values that reproduce those runs (as
# ``align train``'s own resume check reads them): left out of a step's configuration at these values,
# so the recorded trainings and the evaluations that depend on them stay reusable.
TRAIN_FIELDS_ADDED = run_dir.FIELDS_ADDED


def without_added(config: dict) -> dict:
    """A training configuration without the :data:`TRAIN_FIELDS_ADDED` at their reproducing values (applied
    to what a step expects and to what a file records alike, so old and new records compare equal)."""
    return {k: v for k, v in config.items() if k not in TRAIN_FIELDS_ADDED or v != TRAIN_FIELDS_ADDED[k]}


def recorded_training(data: dict) -> dict:
    """The configuration a recorded training step holds, compared as :func:`without_added`."""
    return without_added(data.get("step_config", {}))


# align eval fields added after evaluations were recorded, with the values that reproduce them
EVAL_FIELDS_ADDED = {"val": None}


def recorded_eval(data: dict) -> dict:
    """The configuration a recorded evaluation step holds (:data:`EVAL_FIELDS_ADDED` filled in where it lacks
    them), its nested training compared as :func:`without_added`."""
    config = {**EVAL_FIELDS_ADDED, **data.get("step_config", {})}
    return {**config, "trained": without_added(config["trained"])} if "trained" in config else config


def fallback_caveat(rows: dict[str, dict], mode: str) -> str:
    """" (falls back to the proposal for N %)" when ``mode`` did so for >= 90 % of its tokens, else ""."""
    fallback = rows.get(mode, {}).get("fallback_rate")
    return (f" (falls back to the proposal for {100 * fallback:.0f} %)"
            if fallback is not None and fallback >= FALLBACK_IS_PROPOSAL else "")
