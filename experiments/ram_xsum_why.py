"""Why ``ram_xsum.py``'s RAM rows miss a target, read from data: the small aligner's and the fine-tunes' held-out
likelihood of the reference summaries, the likelihood the RAM product ``P_M · Q^w`` itself gives them
(one more step, on the val prompts only), how often the chosen mode follows each model's greedy token, and
the lengths and endings of what each system writes against the references'."""

from __future__ import annotations

import json
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
    expected = {"aligner": pipeline.train_expected(pipeline.small), "weights": weights, "dtype": pipeline.args.dtype,
                "batch_size": pipeline.budget.eval_batch_size, "responses": "val held-out reference summaries"}

    def compute():
        from amendlm.modeling import load_model, pad_token_id, resolve_dtype
        from amendlm.ram.examples import build_examples, heldout_ids
        from amendlm.ram.generate import shared_vocab_size
        from amendlm.ram.likelihood import product_response_nll

        pipeline.trained(pipeline.small)
        proposal, tokenizer = load_model(pipeline.args.proposal, device=pipeline.args.device)
        aligner, aligner_tokenizer = load_model(f"{small.out}/aligner", device=pipeline.args.device)
        vocab = shared_vocab_size(tokenizer, aligner_tokenizer, pipeline.args.proposal, small.out, proposal, aligner)
        examples = build_examples(small.task, small.samples, tokenizer)
        held = heldout_ids([e.id for e in examples], small.eval_fraction, small.seed)
        pairs = [e.positive for e in examples if e.id in held]
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


def why_missed(entry: dict, heldout_per_epoch: dict[str, list[dict]], small: str, product: dict | None,
               ref_words: float | None, labels: dict[str, str]) -> str:
    """The paragraph under a decoding's targets when the best RAM mode misses one, from the data.

    Args:
        entry: the decoding's summary (``targets``, ``systems`` rows with ``mean_words``, ``eos_share``,
            ``follows_proposal_argmax``, ``follows_aligner_argmax``).
        heldout_per_epoch: training name -> its ``heldout`` log records (``nll``: nats per summary, summed).
        small: the small aligner's training name.
        product: the recorded :func:`product_nll` step, or None.
        ref_words: mean words of the references (:func:`reference_words`).
        labels: system -> its table label.

    Returns:
        markdown; empty when every target is met or no mode is chosen.
    """
    targets = entry.get("targets") or []
    missed = [t for t in targets if not t["met"]]
    if not missed:
        return ""
    best, rows = targets[0]["mode"], entry["systems"]
    parts = []
    proposal0 = _heldout(heldout_per_epoch, FINETUNES[0], 0)  # a fine-tune's step 0 is the proposal itself
    aligner_nll, aligner0 = _heldout(heldout_per_epoch, small, -1), _heldout(heldout_per_epoch, small, 0)
    tuned = {name: _heldout(heldout_per_epoch, name, -1) for name in FINETUNES}
    if aligner_nll is not None and proposal0 is not None:
        parts.append(f"the small aligner is a weaker model of the reference summaries than the proposal it steers: "
                     f"on the val prompts it gives them {aligner_nll:.1f} nats per summary after training "
                     f"({aligner0:.1f} before), the proposal {proposal0:.1f}, "
                     + " and ".join(f"{labels[n]} {v:.1f}" for n, v in tuned.items() if v is not None)
                     + " (held-out loss of each training)")
    if product:
        nll = {r["weight"]: r["nll"] for r in product["nll"]}
        best_w = min(nll, key=lambda w: (nll[w], w))
        grid = ", ".join(f"w = {w:g}: {v:.1f}" for w, v in nll.items())
        gap = min((v for v in tuned.values() if v is not None), default=None)
        parts.append(f"the product P_M · Q^w that `mds` decodes (w = 1/T_e; w = 0 is the proposal, w = 1 the paper's P_M · Q) gives the same "
                     f"summaries {grid} nats; its best, w = {best_w:g}, is {nll[0.0] - nll[best_w]:.1f} nats better than "
                     "the proposal alone" + ("" if gap is None else f" and {nll[best_w] - gap:.1f} nats short of the "
                                             "better fine-tune: at no weight on this grid does the product come as close "
                                             "to the references as the fine-tune"))
    row = rows.get(best, {})
    if row.get("follows_proposal_argmax") is not None:
        parts.append(f"`{best}` picks the proposal's own greedy token at {100 * row['follows_proposal_argmax']:.1f} % of "
                     f"steps and the aligner's at {100 * (row.get('follows_aligner_argmax') or 0):.1f} %")
    lengths = [f"{labels.get(s, s)} {rows[s]['mean_words']:.1f} words ({100 * rows[s]['eos_share']:.0f} % ended by EOS)"
               for s in ("proposal", best, *FINETUNES) if s in rows]
    if lengths:
        parts.append(("the references average " + f"{ref_words:.1f} words; " if ref_words else "")
                     + "; ".join(lengths))
    return "**Why targets are missed** (read from the data): " + "; ".join(parts) + "." if parts else ""


def short_why(heldout_per_epoch: dict[str, list[dict]], small: str, product: dict | None) -> str:
    """One sentence for the README's verdict: the val references' NLL under the proposal, the small aligner, the best
    product ``P_M · Q^w`` and the better fine-tune (empty when a number is missing)."""
    proposal0, aligner_nll = _heldout(heldout_per_epoch, FINETUNES[0], 0), _heldout(heldout_per_epoch, small, -1)
    tuned = [v for v in (_heldout(heldout_per_epoch, n, -1) for n in FINETUNES) if v is not None]
    if None in (proposal0, aligner_nll) or not tuned or not product:
        return ""
    nll = {r["weight"]: r["nll"] for r in product["nll"]}
    best_w = min(nll, key=lambda w: (nll[w], w))
    return (f"Why, in likelihood (nats per reference summary, val prompts): the proposal {proposal0:.1f}, the small aligner "
            f"{aligner_nll:.1f}, the best product P_M · Q^w that RAM decodes (w = {best_w:g}) {nll[best_w]:.1f}, the better "
            f"fine-tune {min(tuned):.1f}: this aligner moves the proposal only a little of the way to the fine-tune.")
