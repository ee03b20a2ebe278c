"""Why ``ram_xsum.py``'s RAM rows miss a target, read from data: the small aligner's and the fine-tunes' held-out
likelihood of the reference summaries, the likelihood the RAM product ``P_M · Q^w`` itself gives them
(one more step, on the val prompts only), how often the chosen mode follows each model's greedy token, and
the lengths and endings of what each system writes against the references'."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ram_common import FINETUNES

STEP = "val_product_nll"


def product_weights(aligner_temperatures: tuple[float, ...]) -> list[float]:
    """The aligner weights ``w = 1 / T_e`` scored: 0 (the proposal alone) and each grid temperature's, ascending."""
    return sorted({0.0, *(1.0 / t for t in aligner_temperatures)})


def product_nll(pipeline, in_repo) -> dict | None:
    """The step ``val_product_nll``: the mean summed NLL (nats per summary) of the val prompts' reference summaries
    under ``P_M · Q^w`` renormalised per token (:func:`amendlm.ram.likelihood.product_response_nll`), the small
    aligner trained, ``w`` over :func:`product_weights`; the val prompts are those its training held out.
    With ``--render-available``: the recorded step or None.  ``in_repo``: the context the pipeline's steps run in
    (its relative paths resolved from the repository)."""
    small = pipeline.trainings[pipeline.small]
    weights = product_weights(pipeline.budget.aligner_temperatures)
    from common import resolved_dtype

    expected = {"aligner": pipeline.train_expected(pipeline.small), "weights": weights,
                "dtype": resolved_dtype(pipeline.args.dtype, pipeline.args.device),
                "batch_size": pipeline.budget.eval_batch_size, "responses": "val held-out reference summaries"}

    def compute():
        from amendlm.modeling import load_model, pad_token_id, resolve_dtype
        from amendlm.ram.examples import build_examples, heldout_ids
        from amendlm.ram.generate import shared_vocab_size
        from amendlm.ram.likelihood import product_response_nll

        n_heldout = pipeline.trained(pipeline.small)["summary"]["n_heldout"]
        proposal, tokenizer = load_model(pipeline.args.proposal, device=pipeline.args.device)
        aligner, aligner_tokenizer = load_model(f"{small.out}/aligner", device=pipeline.args.device)
        vocab = shared_vocab_size(tokenizer, aligner_tokenizer, pipeline.args.proposal, small.out, proposal, aligner)
        examples = build_examples(small.task, small.samples, tokenizer)
        held = heldout_ids([e.id for e in examples], small.eval_fraction, small.seed)
        pairs = [e.positive for e in examples if e.id in held]
        if len(pairs) != n_heldout:
            raise SystemExit(f"{STEP}: {len(pairs)} held-out prompts rebuilt, the training held out {n_heldout}")
        nll = product_response_nll(proposal, aligner, pairs, pad_token_id(tokenizer), weights,
                                   batch_size=pipeline.budget.eval_batch_size, vocab_size=vocab,
                                   dtype=resolve_dtype(pipeline.args.dtype, pipeline.args.device))
        return {"n_prompts": len(pairs), "nll": [{"weight": w, "nll": nll[w]} for w in weights]}

    path = pipeline.exp.results / f"{STEP}.json"
    if pipeline.args.render_available:
        return pipeline._recorded(path, expected)
    with in_repo():
        return pipeline.exp.step(path, expected, compute)


def reference_words(paths: list[Path]) -> float | None:
    """Mean words of the reference summaries, read from the first ``*.generations.jsonl`` beside an eval step
    (counted as ``align eval`` counts a prediction's: whitespace-split)."""
    for path in paths:
        generations = path.with_suffix(".generations.jsonl")
        if generations.is_file():
            refs = {}
            for line in generations.read_text().splitlines():
                row = json.loads(line)
                refs.setdefault(row["id"], row["reference"])
            return sum(len(r.split()) for r in refs.values()) / len(refs) if refs else None
    return None


def _heldout(heldout_per_epoch: dict[str, list[dict]], name: str, index: int) -> float | None:
    records = heldout_per_epoch.get(name) or []
    return records[index]["nll"] if records else None


def likelihoods(heldout_per_epoch: dict[str, list[dict]], small: str, product: dict | None) -> dict:
    """The val references' NLL (nats per summary) each model gives them: ``proposal`` (the product step's w = 0, else
    a fine-tune's step-0 held-out loss, which is the proposal itself), ``aligner`` / ``aligner_before`` (the small
    aligner's last / first held-out loss), ``tuned`` (fine-tune name -> its last held-out loss), ``product``
    (w -> NLL, empty without the step), ``best_w`` and ``moved``: the share of the way from the proposal to the better
    fine-tune that the best product goes, ``(P_0 - best) / (P_0 - FT)`` (None when not defined)."""
    nll = {r["weight"]: r["nll"] for r in product["nll"]} if product else {}
    proposal = nll.get(0.0, _heldout(heldout_per_epoch, FINETUNES[0], 0))
    tuned = {n: v for n in FINETUNES if (v := _heldout(heldout_per_epoch, n, -1)) is not None}
    best_w = min(nll, key=lambda w: (nll[w], w)) if nll else None
    ft = min(tuned.values(), default=None)
    moved = (None if best_w is None or proposal is None or ft is None or proposal <= ft
             else (proposal - nll[best_w]) / (proposal - ft))
    return {"proposal": proposal, "aligner": _heldout(heldout_per_epoch, small, -1),
            "aligner_before": _heldout(heldout_per_epoch, small, 0), "tuned": tuned, "product": nll, "best_w": best_w,
            "fine_tune": ft, "moved": moved}


def _moved_words(moved: float) -> str:
    if moved <= 0:
        return "no closer to the references than the proposal alone"
    if moved >= 1:
        return "as close to the references as the better fine-tune, or closer"
    return f"{100 * moved:.0f} % of the way from the proposal to the better fine-tune"


def why_missed(entry: dict, heldout_per_epoch: dict[str, list[dict]], small: str, product: dict | None,
               ref_words: float | None, labels: dict[str, str]) -> str:
    """The paragraph under a decoding's targets when the best RAM mode misses one, from the data.

    Args:
        entry: the decoding's summary (``greedy``, ``targets``, ``systems`` rows with ``mean_words``, ``eos_share``,
            ``follows_proposal_argmax``, ``follows_aligner_argmax``).
        heldout_per_epoch: training name -> its ``heldout`` log records (``nll``: nats per summary, summed).
        small: the small aligner's training name.
        product: the recorded :func:`product_nll` step, or None.  Its likelihoods are those of the token-level product
            at ``T_b = 1``, so they are quoted under the greedy decoding only.
        ref_words: mean words of the references (:func:`reference_words`).
        labels: system -> its table label.

    Returns:
        markdown; empty when every target is met or no mode is chosen.
    """
    targets = entry.get("targets") or []
    if not any(not t["met"] for t in targets):
        return ""
    best, rows = targets[0]["mode"], entry["systems"]
    lk = likelihoods(heldout_per_epoch, small, product if entry.get("greedy") else None)
    parts = []
    if lk["aligner"] is not None and lk["proposal"] is not None:
        than = ("is a weaker model of the reference summaries than" if lk["aligner"] > lk["proposal"] else
                "models the reference summaries at least as well as")
        tuned = " and ".join(f"{labels.get(n, n)} {v:.1f}" for n, v in lk["tuned"].items())
        parts.append(f"the small aligner {than} the proposal it steers: on the "
                     f"val prompts it gives them {lk['aligner']:.1f} nats per summary after training "
                     f"({lk['aligner_before']:.1f} before), the proposal {lk['proposal']:.1f}"
                     + (f", {tuned}" if tuned else "") + " (each training's own held-out loss)")
    if lk["best_w"] is not None:
        grid = ", ".join(f"w = {w:g}: {v:.1f}" for w, v in lk["product"].items())
        parts.append("the token-level product softmax(log P_M + w log Q) that `mds` decodes (w = 1/T_e; w = 0 is the "
                     f"proposal, w = 1 the plain product) gives the same summaries {grid} nats; its best, w = "
                     f"{lk['best_w']:g}, is " + (_moved_words(lk["moved"]) if lk["moved"] is not None else
                                                  f"{lk['product'][lk['best_w']]:.1f} nats"))
    row = rows.get(best, {})
    if row.get("follows_proposal_argmax") is not None and row.get("follows_aligner_argmax") is not None:
        parts.append(f"`{best}` picks the proposal's own greedy token at {100 * row['follows_proposal_argmax']:.1f} % of "
                     f"steps and the aligner's at {100 * row['follows_aligner_argmax']:.1f} %")
    lengths = [f"{f'`{s}`' if s == best else labels.get(s, s)} {rows[s]['mean_words']:.1f} words "
               f"({100 * rows[s]['eos_share']:.0f} % ended by EOS)" for s in ("proposal", best, *FINETUNES) if s in rows]
    if lengths:
        parts.append((f"the references average {ref_words:.1f} words; " if ref_words else "") + "; ".join(lengths))
    return "**Why targets are missed** (read from the data): " + "; ".join(parts) + "." if parts else ""


def mode_weight(mode: str | None) -> float | None:
    """The aligner weight w of the token-level product a greedy RAM mode decodes: 1 for ``mds``, ``1 / T_e`` for
    ``mds-te{T_e}`` (the aligner's log-probs divided by its temperature), None for any other mode."""
    if mode == "mds":
        return 1.0
    match = re.fullmatch(r"mds-te([0-9.]+)", mode or "")
    return 1.0 / float(match.group(1)) if match and float(match.group(1)) > 0 else None


def short_why(heldout_per_epoch: dict[str, list[dict]], small: str, product: dict | None,
              chosen: str | None = None) -> str:
    """One sentence for the README's verdict: the val references' NLL under the proposal, the small aligner, the
    token-level product that `mds` decodes at its likelihood-best aligner weight w (and at the chosen greedy mode's
    w, :func:`mode_weight`, when that differs and was measured) and the better fine-tune (empty when a number is
    missing)."""
    lk = likelihoods(heldout_per_epoch, small, product)
    if None in (lk["proposal"], lk["aligner"], lk["fine_tune"], lk["best_w"], lk["moved"]):
        return ""
    w = mode_weight(chosen)
    at_chosen = (f" (the chosen greedy mode `{chosen}` decodes w = {w:g}: {lk['product'][w]:.1f})"
                 if w is not None and w != lk["best_w"] and w in lk["product"] else "")
    return (f"Why, in likelihood (nats per reference summary, val prompts, greedy's T = 1): the proposal "
            f"{lk['proposal']:.1f}, the small aligner {lk['aligner']:.1f}, the product `mds` decodes at its "
            f"likelihood-best aligner weight w = {lk['best_w']:g} {lk['product'][lk['best_w']]:.1f}{at_chosen}, the "
            f"better fine-tune {lk['fine_tune']:.1f}: the best product is {_moved_words(lk['moved'])}.")
