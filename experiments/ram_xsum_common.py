"""ram_xsum's `mds` aligner-temperature lever, its rows of recorded evaluations, and the setting in words.

Under greedy decoding `mds` emits ``argmax_v log P_M(v) + log Q(v) / T_e`` (``rule_mds``: the normalisers of the
log-softmaxes do not move the argmax; the proposal at ``T_b`` = 1), so only the aligner's weight ``w = 1/T_e``
matters: ``T_e`` = 1 is plain `mds`, ``T_e`` -> infinity the proposal.  A larger ``T_e`` may keep the aligner's
useful signal (ending by EOS, shorter) while losing less of the proposal's language.  The lever is decided on
the val prompts only:

* :func:`parse_temperatures`: ``--aligner-temperatures`` (multiples of the decoding's own temperature, so 1
  is always today's `mds`, already evaluated in the RAM val step);
* :func:`mds_temperatures`: `mds` at each other ``T_e`` on val (one recorded step each), the best ``T_e``
  (:func:`best_aligner_temperature`; ties: the smaller; none while a val step is missing) and, when it is
  not the decoding's own, its test row (one more recorded step);
* :func:`ram_candidates`: that variant enters the best-RAM-mode choice (``ram_common.best_ram_mode``) by
  its val ROUGE-L, after the four modes (so a tie keeps the plain mode).
"""

from __future__ import annotations

import argparse

from ram_common import FINETUNES, RAM_MODES, seed_rows

MDS_AT = "mds-te"  # the group (and row) of `mds` at another aligner temperature: mds-te2 = T_e 2


def mds_at(temperature: float) -> str:
    """The group name of `mds` at aligner temperature ``temperature``, e.g. ``mds-te2`` (also its step's suffix)."""
    return f"{MDS_AT}{temperature:g}"


def on_grid(temperature: float) -> float:
    """``temperature`` as its :func:`mds_at` name writes it (``:g``, 6 significant digits), so that the decoding's
    own temperature (e.g. 1/3) and a multiple of it that names the same step compare equal."""
    return float(f"{temperature:g}")


def aligner_temperature_of(group: str) -> float:
    """The aligner temperature of a :func:`mds_at` group.  Raises ValueError for another group."""
    if not group.startswith(MDS_AT):
        raise ValueError(f"{group!r} is not an mds aligner-temperature group ({MDS_AT}T)")
    return float(group[len(MDS_AT):])


def parse_temperatures(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1.0, 2.0, 4.0)``: the aligner temperatures of `mds`, as multiples of the decoding's
    temperature, sorted, 1 (plain `mds`) always included.

    Raises:
        ValueError: a value that is not a number > 0.
    """
    values = {1.0}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"aligner temperature {part!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"aligner temperature {part!r} must be a finite number > 0")
        values.add(value)
    return tuple(sorted(values))


def temperatures_option(text: str) -> tuple[float, ...]:
    """:func:`parse_temperatures` as an argparse ``type`` (its error becomes the option's one-line message)."""
    try:
        return parse_temperatures(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def best_aligner_temperature(val_rougeL: dict[float, float | None]) -> float | None:
    """The aligner temperature whose `mds` has the highest val ROUGE-L, the smaller one on a tie; None when
    any temperature's val score is missing (``None``: its step is not done; no choice from partial data)
    or there is none.  ``val_rougeL``: T_e -> mean ROUGE-L (points) on the val prompts, never test."""
    if not val_rougeL or any(score is None for score in val_rougeL.values()):
        return None
    return max(sorted(val_rougeL), key=lambda t: val_rougeL[t])  # max keeps the first (smallest) of equals


def ram_candidates(variant: str | None) -> tuple[str, ...]:
    """The systems the best RAM mode is chosen among: the four modes, then the chosen `mds` temperature
    variant (when it is not plain `mds`), last so that a tie keeps the earlier."""
    return (*RAM_MODES, variant) if variant else RAM_MODES


def pending_reason(pending: list[str], ram_step: str) -> str | None:
    """Why no RAM mode is chosen on val, for ``ram_common.headline_row``: None when only the RAM val step
    ``ram_step`` is missing (its default), the val steps ``pending`` not done, or, none missing, that the val
    rows hold no RAM mode."""
    if pending == [ram_step]:
        return None
    return ("val steps not done: " + ", ".join(pending) if pending
            else f"no RAM mode ({', '.join(RAM_MODES)}) was evaluated on val")


def with_rows_after(rows: dict[str, dict], anchor: str, extra: dict[str, dict]) -> dict[str, dict]:
    """``rows`` with ``extra`` inserted right after ``anchor`` (at the end when ``anchor`` is absent)."""
    if anchor not in rows:
        return {**rows, **extra}
    out = {}
    for name, row in rows.items():
        out[name] = row
        if name == anchor:
            out.update(extra)
    return out


def rows_of(pipeline, decoding_name: str, decoding: dict, split: str = "test") -> tuple[dict, list, int | None, list[str]]:
    """Every system's row of one decoding on ``split`` (``ram_common.seed_rows``: the mean over its seeds; ``val``:
    the RAM group only), the eval files read, the number of prompts (None when no group is complete) and the
    groups left out (with ``--render-available``, a group whose evaluation is missing for any seed)."""
    groups = ("ram", *FINETUNES) if split == "test" else ("ram",)
    found = {g: {seed: pipeline.evaluated(g, decoding_name, decoding, seed, split) for seed in decoding["seeds"]} for g in groups}
    rows, n_prompts, skipped = seed_rows(found, lambda g, seed: pipeline.eval_path(g, decoding_name, seed, split).name)
    paths = [pipeline.eval_path(g, decoding_name, seed, split) for g in groups if g not in skipped for seed in decoding["seeds"]]
    return rows, paths, n_prompts, skipped


def _mds_group(pipeline, group: str, decoding_name: str, decoding: dict, split: str) -> tuple[dict | None, list, list[str]]:
    """One `mds` temperature group on ``split``: its row (None when a seed's step is missing), files, missing steps."""
    found = {seed: pipeline.evaluated(group, decoding_name, decoding, seed, split) for seed in decoding["seeds"]}
    paths = [pipeline.eval_path(group, decoding_name, seed, split) for seed in found]
    missing = [p.stem for p, data in zip(paths, found.values()) if data is None]
    rows, _, _ = seed_rows({group: found}, lambda g, seed: pipeline.eval_path(g, decoding_name, seed, split).name)
    return (None, [], missing) if missing else (rows["mds"], paths, [])


def mds_temperatures(pipeline, decoding_name: str, decoding: dict, val_rows: dict[str, dict],
                     factors: tuple[float, ...]) -> dict:
    """`mds` at each aligner temperature ``T_e = factor x the decoding's temperature`` on val, the best
    ``T_e`` (:func:`best_aligner_temperature`, the factor 1 read on ``val_rows["mds"]``, the RAM val step), and,
    when that is not the decoding's own, its test row (each other ``T_e`` a recorded step of ``pipeline``).

    Returns:
        ``{"temperatures": [T_e], "val_rougeL": {"T_e": ROUGE-L or None}, "chosen": T_e or None,
        "row": the chosen group when not plain mds (a RAM candidate) else None, "best_row": the val row of the
        best T_e ("mds" or "row"; None when not chosen or only one T_e), "val_rows": {group: row},
        "test_rows": {group: row} (empty until recorded), "missing": [val step], "paths": [files read]}``.

    Raises:
        ValueError: a temperature's val step was scored on other prompts than the RAM val step.
    """
    own = on_grid(decoding["temperature"])
    temperatures = sorted({on_grid(factor * decoding["temperature"]) for factor in factors} | {own})
    scores = {own: val_rows["mds"]["rougeL"] if "mds" in val_rows else None}
    out = {"temperatures": temperatures, "val_rows": {}, "test_rows": {}, "missing": [], "paths": [], "row": None}
    n_val = len(val_rows["mds"]["per_prompt_rougeL"]) if "mds" in val_rows else None
    for te in (t for t in temperatures if t != own):
        row, paths, missing = _mds_group(pipeline, mds_at(te), decoding_name, decoding, "val")
        if row is not None and n_val is not None and len(row["per_prompt_rougeL"]) != n_val:
            raise ValueError(f"{paths[0].name}: {len(row['per_prompt_rougeL'])} val prompts, the RAM val step {n_val}")
        scores[te] = None if row is None else row["rougeL"]
        out["missing"] += missing
        out["paths"] += paths
        if row is not None:
            out["val_rows"][mds_at(te)] = row
    out["val_rougeL"] = {f"{t:g}": scores[t] for t in temperatures}
    out["chosen"] = chosen = best_aligner_temperature(scores)
    out["best_row"] = None if chosen is None or len(temperatures) < 2 else ("mds" if chosen == own else mds_at(chosen))
    if chosen is not None and chosen != own:
        out["row"] = mds_at(chosen)
        row, paths, _ = _mds_group(pipeline, out["row"], decoding_name, decoding, "test")
        if row is not None:
            out["test_rows"], out["paths"] = {out["row"]: row}, out["paths"] + paths
    return out


def temperature_labels(temps: dict, own: float) -> tuple[dict[str, str], dict[str, str]]:
    """``(test labels, val labels)`` of the `mds` temperature rows (val: plain `mds` named with its ``T_e``)."""
    if len(temps["temperatures"]) < 2:
        return {}, {}
    own = on_grid(own)
    test = {temps["row"]: f"RAM `mds` (T_e = {aligner_temperature_of(temps['row']):g}, chosen on val)"} if temps["row"] else {}
    val = {"mds": f"RAM `mds` (T_e = {own:g})",
           **{mds_at(t): f"RAM `mds` (T_e = {t:g})" for t in temps["temperatures"] if t != own}}
    return test, val


def temperature_note(temps: dict, own: float) -> str:
    """The aligner-temperature choice in words ("" when only the decoding's own ``T_e`` is asked for)."""
    if len(temps["temperatures"]) < 2:
        return ""
    own = on_grid(own)
    grid = ", ".join(f"{t:g}" for t in temps["temperatures"])
    what = (f"`mds` at aligner temperatures T_e = {grid} (proposal at T {own:g}; the aligner's weight in "
            f"log P_M + log Q / T_e falls as T_e grows; T_e = {own:g} is RAM `mds`): ")
    chosen = temps["chosen"]
    if chosen is None:
        pending = [f"`{s}`" for s in temps["missing"]] + (["the RAM val step"] if temps["val_rougeL"][f"{own:g}"] is None else [])
        return what + f"T_e not chosen yet, val steps not done ({', '.join(pending)}); no choice is made from partial val data."
    what += f"best val ROUGE-L at T_e = {chosen:g} (ties: the smaller T_e)"
    if chosen == own:
        return what + ", RAM `mds` itself: no extra test row."
    return what + (f", evaluated on test as the row `{temps['row']}`, a candidate for the best RAM mode."
                   if temps["test_rows"] else f"; its test row `{temps['row']}` is not evaluated yet.")


def describe(pipeline, trainings: dict[str, dict], n_val: str | None) -> str:
    """The setting in words, from the configurations and the training records (``n_val``: the val prompts the
    best RAM mode was chosen on; None when no val step is done)."""
    small = trainings[pipeline.small]["train_config"]
    lines = [f"Proposal `{pipeline.args.proposal}`; task `{pipeline.test_task.data}` ({pipeline.test_task.split} split), "
             f"documents cut to {pipeline.test_task.max_document_tokens} tokens, at most {pipeline.budget.max_new_tokens} new "
             f"tokens, stop strings {list(pipeline.test_task.stop)!r}."]
    warm = pipeline.warmup
    start = (f"a {warm.steps}-step distillation warm-up (KL to the proposal on the training documents but the val prompts', {warm.max_tokens} "
             f"tokens each, batch {warm.batch_size})" if warm else "no warm-up")
    lines.append(f"Small aligner: the proposal's first {pipeline.args.aligner_layers} blocks (+ embeddings, final norm, head; "
                 f"{small.get('trainable_parameters', 0):,} parameters, all trained), after {start}, trained with the "
                 f"residual loss (α = {small['loss']['alpha']:g}) for {small['epochs']} epochs on {small['n_examples']} prompts "
                 f"({small['n_heldout']} held out), batch {small['batch_size']}, lr {small['learning_rate']:g}, {small['dtype']}.")
    for name in FINETUNES:
        if trainings.get(name) is None:
            lines.append(f"Direct fine-tune `{name}`: not trained yet.")
            continue
        c = trainings[name]["train_config"]
        lines.append(f"Direct fine-tune `{name}`: the proposal, {'LoRA r ' + str(c['lora_r']) if c['lora'] else 'all weights'}, "
                     f"α = 0 (SFT), same prompts, epochs and batch, lr {c['learning_rate']:g}, {c['dtype']}.")
    factors = [f for f in pipeline.budget.aligner_temperatures if f != 1]
    lever = (f"  `mds` is also evaluated on val with the aligner's temperature T_e at {', '.join(f'{f:g}×' for f in factors)} "
             "the decoding's (the proposal's unchanged); the best T_e on val (ties: the smaller) gets a test row and "
             "is a candidate for the best RAM mode." if factors else "")
    lines.append("RAM modes: proposal top-p 0.95, aligner top-p 0.9, PAR-KL threshold 0.1 nats, SIR 8 candidates "
                 "(seeded resampling, also in the greedy decoding), EOS priority." + lever + "  "
                 + (f"The best RAM mode is chosen by ROUGE-L on the {n_val} val prompts, the training prompts held out of "
                    "the small aligner's training (`align eval --split val`; sampled: mean over seeds), never on the test "
                    "prompts; the targets read that mode's test row." if n_val else
                    "The best RAM mode is chosen on val prompts (held out of the small aligner's training), never on the "
                    "test prompts: not chosen yet (val steps not done), so no target is read.")
                 + "  Intervals: 95 % paired bootstrap over prompts "
                 "(2,000 draws); sampled rows average each prompt's ROUGE-L over the seeds first.")
    return "  \n".join(lines)


def verdict(decodings: dict[str, dict], command: str, why: str = "") -> str:
    """The README's answer to issue 10's questions, read from each decoding's targets: does the best RAM mode
    (chosen on val) beat its aligner alone, the proposal, and come within reach of the direct fine-tunes.

    ``decodings``: name -> the results' decoding entry (``targets`` rows of :func:`ram_common.target_rows`,
    ``best_mode``, ``greedy``); the greedy and the sampled entry (absent ones are named as not run).
    ``why``: a sentence added as a last bullet when a target is missed.
    Returns markdown, one bullet per decoding."""
    names = {"aligner": "its aligner alone", "proposal": "the proposal alone", "sft-lora": "the LoRA fine-tune",
             "sft-full": "the full fine-tune"}
    lines = []
    for kind, greedy in (("greedy", True), ("sampled", False)):
        entry = next((d for d in decodings.values() if bool(d.get("greedy")) == greedy), None)
        if entry is None or not entry.get("targets"):
            state = "not run yet" if entry is None else "its best mode is not chosen yet (val step pending)"
            lines.append(f"- {kind.capitalize()} decoding: {state}; `{command}` computes it.")
            continue
        parts = [f"{'beats' if t['difference'] > 0 and t['low'] > 0 else 'does not beat'} {names.get(t['against'], t['against'])} "
                 f"({t['difference']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] ROUGE-L; target {t['target']:+g}: "
                 f"{'met' if t['met'] else 'missed'})" for t in entry["targets"]]
        lines.append(f"- {kind.capitalize()} decoding, best RAM mode chosen on val `{entry['best_mode']}`: "
                     + "; ".join(parts) + ".")
    missed = any(not t["met"] for d in decodings.values() for t in d.get("targets") or [])
    return "\n".join(lines + ([f"- {why}"] if why and missed else []))
