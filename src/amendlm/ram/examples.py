"""RAM training examples: each prompt with its target ``y`` and its proposal sample ``y'``, the held-out
slice, and the aligner's log-probs of both in one forward.

A training prompt becomes a :class:`PairExample`: ``x + y`` (target, or DPO's chosen) and ``x + y'``
(the proposal sample, or DPO's rejected).  :func:`heldout_ids` puts aside a seeded share of the
prompts (by id, so it does not depend on row order); the trainer never trains on them and reports
the loss on them (:func:`heldout_loss`) to show whether the aligner has converged or overfits.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from amendlm.ram.data import TaskConfig, encode_prompt, encode_response, load_task
from amendlm.ram.sample import read_samples
from amendlm.scoring import EncodedPair, collate, sequence_logps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairExample:
    """One training prompt: ``x + y`` (positive) and ``x + y'`` (negative) as :class:`EncodedPair` s."""

    id: str
    positive: EncodedPair
    negative: EncodedPair


def sample_tokens(tokenizer, sample: dict) -> list[int]:
    """The tokens a proposal sample ``y'`` contributes: ``tokens(text)``, plus ``[EOS]`` only when the
    proposal itself ended it with EOS (``finish_reason == "eos"``).

    A sample cut at a stop string (``stop``) or at ``max_new_tokens`` (``length``) gets no EOS: the
    proposal never emitted one there, so the aligner is not taught an ending the proposal did not make.
    """
    ids = tokenizer(str(sample["sample"]).strip(), add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if sample.get("finish_reason") == "eos" else ids


def has_sample(sample: dict | None) -> bool:
    """Whether a prompt becomes a training example: it has a proposal sample that is not blank.

    :func:`build_examples` skips the other prompts before :func:`heldout_ids` draws the held-out share,
    so ``align eval --split val`` (:mod:`amendlm.ram.validation`) drops them with this same test."""
    return sample is not None and bool(str(sample["sample"]).strip())


def build_examples(task: TaskConfig, samples_path: str, tokenizer) -> list[PairExample]:
    """Join the task's records with their proposal samples by id (:func:`sample_tokens`); records
    without one (:func:`has_sample`) are skipped.

    Raises:
        ValueError: no record has a sample (names both files).
    """
    records = load_task(task, tokenizer)
    samples = read_samples(samples_path)
    examples = []
    for record in records:
        sample = samples.get(record.id)
        if not has_sample(sample):
            continue
        prompt = encode_prompt(tokenizer, record.prompt, task.chat_template)
        target = encode_response(tokenizer, record.response)
        negative = sample_tokens(tokenizer, sample)
        examples.append(PairExample(record.id, EncodedPair(prompt + target, len(target)),
                                    EncodedPair(prompt + negative, len(negative))))
    if not examples:
        raise ValueError(f"no record of {task.data} ({task.split}) has a sample in {samples_path}")
    missing = len(records) - len(examples)
    if missing:
        logger.warning("%d of %d training prompts have no (non-empty) sample and are skipped", missing, len(records))
    return examples


def heldout_ids(ids: list[str], fraction: float, seed: int = 0) -> set[str]:
    """The held-out prompt ids: the first ``round(fraction * n)`` ids ranked by ``sha256(f"heldout:{seed}:{id}")``.

    At least one id when ``fraction > 0`` and at most ``n - 1`` (something is left to train on);
    none when ``fraction`` is 0.  Independent of the order of ``ids``.

    Raises:
        ValueError: ``fraction`` not in [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {fraction}")
    if fraction == 0 or len(ids) < 2:
        return set()
    n = min(max(1, round(fraction * len(ids))), len(ids) - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"heldout:{seed}:{i}".encode()).hexdigest())
    return set(ranked[:n])


def pair_logps(model, batch: list[PairExample], pad_id: int, negatives: bool = True) -> dict[str, torch.Tensor]:
    """One forward over ``[x+y ...; x+y' ...]`` -> summed log-probs and token counts of each half.

    Sequences are left-padded so every response sits in the last columns and the LM head runs only
    there (``logits_to_keep``).

    Args:
        negatives: False runs only ``x+y`` (a loss that ignores ``y'``, e.g. the residual loss at
            alpha 0, which is SFT): ``negative_logps`` are then zeros without a graph and
            ``negative_n`` ones, so the loss's ``alpha * 0`` term stays finite.

    Returns:
        dict of ``(batch,)`` tensors ``positive_logps, negative_logps, positive_n, negative_n`` (natural
        log, summed over each response's tokens; prompt and padding excluded).
    """
    device = next(model.parameters()).device
    half = len(batch)
    if not negatives:
        logps, n_tokens = response_logps(model, [e.positive for e in batch], pad_id, device)
        return {"positive_logps": logps, "negative_logps": torch.zeros_like(logps).detach(),
                "positive_n": n_tokens, "negative_n": torch.ones_like(n_tokens)}
    logps, n_tokens = response_logps(model, [e.positive for e in batch] + [e.negative for e in batch], pad_id, device)
    return {"positive_logps": logps[:half], "negative_logps": logps[half:],
            "positive_n": n_tokens[:half], "negative_n": n_tokens[half:]}


def left_padded_responses(pairs: Sequence[EncodedPair], pad_id: int,
                          device) -> tuple[dict[str, torch.Tensor], int, torch.Tensor, torch.Tensor]:
    """Collate ``pairs`` left-padded for scoring their responses with ``logits_to_keep``.

    Returns ``(inputs, keep, ids, mask)``: the model inputs (``input_ids``, ``attention_mask``, each
    ``(n, T)``, on ``device``); ``keep``, the number of last columns that hold every response token
    (plus the one before it, whose logits predict the first); and those columns' ``(n, keep)`` ids
    and loss mask, aligned with ``model(**inputs, logits_to_keep=keep).logits`` ``(n, keep, vocab)``
    as :func:`amendlm.scoring.sequence_logps` expects.
    """
    inputs = {k: v.to(device) for k, v in collate(list(pairs), pad_id, padding_side="left").items()}
    loss_mask = inputs.pop("loss_mask")
    keep = int(loss_mask.sum(-1).max()) + 1  # left padding: scored tokens are in the last columns
    return inputs, keep, inputs["input_ids"][:, -keep:], loss_mask[:, -keep:]


def response_logps(model, pairs: list[EncodedPair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One left-padded forward over ``pairs`` -> ``(n,)`` summed response log-probs and ``(n,)`` token counts,
    the LM head run only on the last columns that hold responses (``logits_to_keep``)."""
    inputs, keep, ids, mask = left_padded_responses(pairs, pad_id, device)
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (n, keep, vocab)
    return sequence_logps(logits, ids, mask)


@torch.no_grad()
def heldout_loss(model, examples: list[PairExample], loss_fn, loss_config, pad_id: int, batch_size: int,
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The training loss on held-out examples, in eval mode (dropout off), without gradients.

    Each batch's loss and diagnostics (batch means, :mod:`amendlm.ram.losses`) are weighted by the
    batch's size, so the result is the mean over examples, comparable across batch sizes.

    Returns:
        ``{"loss": ..., **diagnostics}`` (e.g. ``nll`` and ``sample_logp`` of the residual loss, nats).

    Raises:
        ValueError: no examples.
    """
    from amendlm.modeling import autocast, eval_mode

    if not examples:
        raise ValueError("no held-out examples to evaluate")
    totals: dict[str, float] = {}
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = examples[start: start + batch_size]
            with autocast(dtype, device):
                scores = pair_logps(model, batch, pad_id)
            loss, parts = loss_fn(scores["positive_logps"].float(), scores["negative_logps"].float(), loss_config,
                                  scores["positive_n"], scores["negative_n"])
            for name, value in {"loss": loss, **parts}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(batch)
    out = {name: total / len(examples) for name, total in totals.items()}
    if not all(math.isfinite(v) for v in out.values()):
        logger.warning("held-out loss is not finite: %s", out)
    return out
