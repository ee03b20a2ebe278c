"""Token-by-token decoding of proposal x aligner: batched, both models KV-cached, left padding exact.

The step rule is a pure function from :mod:`amendlm.ram.decoding`; this module only steps models:

1. left-pad the prompts; position ids come from the attention mask, so a padded row sees exactly
   the positions it would see alone;
2. prefill each model that the mode uses once (KV cache kept, only the last position's logits
   computed), then one cached forward of each model per new token;
3. slice both models' logits to the shared tokenizer's vocabulary (padded embedding rows never
   sample), apply the rule, pick a token (argmax or a seeded draw);
4. stop a row at EOS, at a stop string, or at ``max_new_tokens``; stream each step to a callback.

First-token latency is one prefill of each model, as for ordinary decoding.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from amendlm.modeling import eval_mode, parse_dtype, resolve_dtype
from amendlm.ram.cached import CachedLM, cache_argument, left_pad, shared_vocab_size  # noqa: F401 (re-exported)
from amendlm.ram.choices import ChoiceCounts, choice_flags, count_flags
from amendlm.ram.decoding import DecodeConfig, apply_rule, get_mode, pick_tokens, repetition_penalty


@dataclass
class GenerateConfig:
    """Loop parameters of :func:`generate` (the rule's parameters are in :class:`DecodeConfig`).

    Attributes:
        max_new_tokens: tokens generated per prompt at most. 64.
        greedy: argmax of the rule's logits instead of a draw.  ``sir`` (and ``sir-best``) stay seeded random
            draws: their rule returns the resampled token alone, so argmax and a draw agree.
        seed: seeds the ``torch.Generator`` of every draw, so a run is reproducible.
        stop: strings that end a row (the returned text stops before the first one).
        batch_size: prompts decoded together (sorted by length to limit padding). 8.
        dtype: ``fp32`` (default; exact, fastest on CPUs without bf16 units), ``bf16`` autocast, or ``auto``
            (bf16 where the models' device does it natively fast, else fp32; :func:`amendlm.modeling.resolve_dtype`).
    """

    max_new_tokens: int = 64
    greedy: bool = False
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.stop = tuple(s for s in self.stop if s)
        parse_dtype(self.dtype)


@dataclass
class Generation:
    """One decoded row: new token ids (EOS excluded), their text (cut before a stop string), and why it ended
    (``eos``, ``stop`` or ``length``)."""

    token_ids: list[int]
    text: str | None
    finish_reason: str


@dataclass
class GenerationStats:
    """Timing of one :func:`generate` call: wall seconds, seconds to the first token of the first batch,
    decoding steps run, and tokens emitted (all rows, until each row ended); ``choices``: per decoded
    token step (EOS steps included), how often the chosen token was the aligner's / the proposal's argmax
    and how often ``par-kl`` fell back to the proposal (:class:`amendlm.ram.choices.ChoiceCounts`;
    :meth:`ChoiceCounts.rates` gives the shares)."""

    seconds: float = 0.0
    first_token_seconds: float | None = None
    steps: int = 0
    new_tokens: int = 0
    per_batch: list[dict] = field(default_factory=list)
    choices: ChoiceCounts = field(default_factory=ChoiceCounts)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
Chooser = Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass
class DecodeStep:
    """What :func:`decode_steps` yields after each token choice, over the whole batch (original row order).

    Attributes:
        step: 0-based index of the new token.
        next_ids: ``(batch,)`` long, the token chosen for every row; rows that had ended get ``pad_token_id``.
        active: ``(batch,)`` bool, rows that were still decoding at this step (they received ``next_ids``).
        is_eos: ``(batch,)`` bool, active rows whose token is an end-of-sequence id.
        finished: ``(batch,)`` bool, rows that have ended, EOS of this step included.  The consumer (under
            ``torch.inference_mode``: it is an inference tensor) may set more rows to True (a stop string, a
            per-row length limit, a cancelled request) before resuming the generator; they are then no
            longer decoded.
        choices: with ``track_choices``, this step's :class:`amendlm.ram.choices.ChoiceCounts` over the
            active rows (what the chosen tokens followed); else ``None``.
    """

    step: int
    next_ids: torch.Tensor
    active: torch.Tensor
    is_eos: torch.Tensor
    finished: torch.Tensor
    choices: ChoiceCounts | None = None


@torch.inference_mode()
def decode_steps(
    proposal, aligner, prompts: Sequence[Sequence[int]], decode: DecodeConfig, max_new_tokens: int, *,
    vocab_size: int, pad_token_id: int, eos_token_ids: Sequence[int], dtype: torch.dtype = torch.float32,
    greedy: bool = False, generator: torch.Generator | None = None, choose: Chooser | None = None,
    prune_finished: bool = False, track_choices: bool = False,
) -> Iterator[DecodeStep]:
    """The decoding loop as a generator: prefill, then one token per row and per ``next()``.

    Args:
        proposal, aligner: causal LMs; only those ``decode.mode`` uses are run.
        prompts: token ids of each prompt (left-padded here).
        max_new_tokens: steps at most.
        choose: ``(proposal_logits, aligner_logits, rows) -> (live,) token ids`` for the live rows: both
            logits ``(live, vocab)`` after the repetition penalty (``None`` for a model the mode does not
            use), ``rows`` ``(live,)`` their indices in ``prompts`` (per-row sampling parameters).
            Default: the mode's rule then argmax (``greedy``) or a draw from ``generator``.
        prune_finished: drop ended rows from the KV caches before the next step (a served batch whose
            rows end early gets cheaper; off by default, so that a seeded batch draws the same random
            numbers as before this option existed).
        track_choices: fill :attr:`DecodeStep.choices` (:func:`amendlm.ram.choices.choice_flags` on the
            live rows' logits after the repetition penalty; costs two argmaxes per step, and a KL for ``par-kl``).

    Yields:
        :class:`DecodeStep` per token; the loop stops when every row has finished or after
        ``max_new_tokens`` steps.  First-token latency is one prefill of each model used.
    """
    mode = get_mode(decode.mode)
    models = {role: model for role, model, used in (("proposal", proposal, mode.uses_proposal),
                                                    ("aligner", aligner, mode.uses_aligner)) if used}
    eos_token_id = int(eos_token_ids[0]) if eos_token_ids else None
    if choose is None:
        def choose(proposal_logits, aligner_logits, rows):
            rule_logits = apply_rule(proposal_logits, aligner_logits, decode, eos_token_id=eos_token_id, generator=generator)
            return pick_tokens(rule_logits, greedy, generator)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    runners = {role: CachedLM(model, vocab_size, dtype) for role, model in models.items()}
    logits = {role: runner.prefill(input_ids, attention_mask) for role, runner in runners.items()}
    batch, device = len(prompts), next(iter(logits.values())).device
    eos = torch.tensor(list(eos_token_ids), device=device, dtype=torch.long)
    seen = torch.zeros((batch, vocab_size), dtype=torch.bool, device=device)
    if decode.repetition_penalty != 1.0:
        prompt_ids = input_ids.to(device).clamp(max=vocab_size - 1)
        seen.scatter_(1, prompt_ids, attention_mask.to(device).bool())
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    live = torch.arange(batch, device=device)  # original rows still held in the caches
    for step in range(max_new_tokens):
        step_logits = logits if decode.repetition_penalty == 1.0 else {
            role: repetition_penalty(value, seen[live], decode.repetition_penalty) for role, value in logits.items()}
        live_ids = choose(step_logits.get("proposal"), step_logits.get("aligner"), live)
        next_ids = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
        next_ids[live] = live_ids.to(device)
        active = ~finished
        next_ids = torch.where(active, next_ids, torch.full_like(next_ids, pad_token_id))
        is_eos = torch.isin(next_ids, eos) & active
        seen.scatter_(1, next_ids.unsqueeze(-1), active.unsqueeze(-1))
        choices = None
        if track_choices:
            flags = choice_flags(decode, step_logits.get("proposal"), step_logits.get("aligner"), live_ids)
            choices = count_flags(flags, active[live])
        finished |= is_eos
        yield DecodeStep(step, next_ids, active, is_eos, finished, choices)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        if prune_finished and bool(finished[live].any()):
            keep = (~finished[live]).nonzero().flatten()
            live = live[keep]
            for runner in runners.values():
                runner.keep_rows(keep)
        logits = {role: runner.step(next_ids[live]) for role, runner in runners.items()}


@torch.inference_mode()
def generate_batch(
    proposal, aligner, prompts: Sequence[Sequence[int]], decode: DecodeConfig, config: GenerateConfig, *,
    vocab_size: int, pad_token_id: int, eos_token_ids: Sequence[int], tokenizer=None,
    generator: torch.Generator | None = None, on_step: Callable | None = None, stats: GenerationStats | None = None,
) -> list[Generation]:
    """Decode one batch of prompts together (see :func:`generate` for the arguments).

    ``on_step(step, token_ids (batch,), finished (batch,) bool)`` is called after every step; rows
    that had already ended receive ``pad_token_id``.  Both models run in eval mode (dropout off)
    and get their own train/eval modes back afterwards (:func:`amendlm.modeling.eval_mode`).
    """
    with contextlib.ExitStack() as stack:
        for model in {id(m): m for m in (proposal, aligner) if m is not None}.values():
            stack.enter_context(eval_mode(model))
        return _generate_batch(proposal, aligner, prompts, decode, config, vocab_size=vocab_size,
                               pad_token_id=pad_token_id, eos_token_ids=eos_token_ids, tokenizer=tokenizer,
                               generator=generator, on_step=on_step, stats=stats)


def _generate_batch(
    proposal, aligner, prompts: Sequence[Sequence[int]], decode: DecodeConfig, config: GenerateConfig, *,
    vocab_size: int, pad_token_id: int, eos_token_ids: Sequence[int], tokenizer=None,
    generator: torch.Generator | None = None, on_step: Callable | None = None, stats: GenerationStats | None = None,
) -> list[Generation]:
    mode = get_mode(decode.mode)
    some_model = proposal if mode.uses_proposal else aligner
    dtype = resolve_dtype(config.dtype, next(some_model.parameters()).device)
    began = time.perf_counter()
    batch = len(prompts)
    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    first_token_seconds = None
    steps = 0
    for state in decode_steps(proposal, aligner, prompts, decode, config.max_new_tokens, vocab_size=vocab_size,
                              pad_token_id=pad_token_id, eos_token_ids=eos_token_ids, dtype=dtype,
                              greedy=config.greedy, generator=generator, track_choices=stats is not None):
        steps += 1
        if state.choices is not None:
            stats.choices.merge(state.choices)
        if first_token_seconds is None:
            first_token_seconds = time.perf_counter() - began
        for row in (state.active & ~state.is_eos).nonzero().flatten().tolist():
            generated[row].append(int(state.next_ids[row]))
            if config.stop and tokenizer is not None and _hits_stop(tokenizer, generated[row], config.stop):
                reasons[row] = "stop"
                state.finished[row] = True
        for row in state.is_eos.nonzero().flatten().tolist():
            reasons[row] = "eos"
        if on_step is not None:
            on_step(state.step, state.next_ids, state.finished.clone())
    if stats is not None:
        seconds = time.perf_counter() - began
        new_tokens = sum(len(g) for g in generated)
        stats.seconds += seconds
        stats.steps += steps
        stats.new_tokens += new_tokens
        if stats.first_token_seconds is None:
            stats.first_token_seconds = first_token_seconds
        stats.per_batch.append({"batch": batch, "prompt_len": max(len(p) for p in prompts), "steps": steps,
                                "new_tokens": new_tokens, "seconds": seconds, "first_token_seconds": first_token_seconds})
    return [Generation(ids, _text(tokenizer, ids, config.stop), reason) for ids, reason in zip(generated, reasons)]


def _hits_stop(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> bool:
    text = tokenizer.decode(token_ids[-32:], skip_special_tokens=True)  # a stop string ends in the tail
    return any(s in text for s in stop)


def _text(tokenizer, token_ids: list[int], stop: tuple[str, ...]) -> str | None:
    if tokenizer is None:
        return None
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def generate(
    proposal, aligner, prompts: Sequence[Sequence[int]], decode: DecodeConfig | None = None,
    config: GenerateConfig | None = None, *, vocab_size: int, pad_token_id: int, eos_token_ids: Sequence[int],
    tokenizer=None, on_batch: Callable[[list[int], list[Generation]], None] | None = None,
    on_step: Callable | None = None, stats: GenerationStats | None = None,
) -> list[Generation]:
    """Decode many prompts with ``decode.mode``, ``config.batch_size`` at a time; results in input order.

    Args:
        proposal, aligner: causal LMs (either may be ``None`` if the mode does not use it).
        prompts: token ids of each prompt (already templated; BOS included if wanted).
        vocab_size: shared tokenizer length (:func:`shared_vocab_size`); logits are sliced to it.
        pad_token_id: fills left padding and the slots of rows that ended.
        eos_token_ids: ids that end a row (the first one drives PAR's EOS priority).
        tokenizer: needed for stop strings and for ``Generation.text``.
        on_batch: called with (input indices, generations) after each batch (checkpointing, printing).
        on_step: streaming callback of :func:`generate_batch`.
        stats: filled with timings.

    Prompts are sorted by length so each batch holds similar lengths; the seed makes the whole run
    reproducible for a fixed batch size.
    """
    decode = decode or DecodeConfig()
    config = config or GenerateConfig()
    mode = get_mode(decode.mode)
    some_model = proposal if mode.uses_proposal else aligner
    if some_model is None:
        raise ValueError(f"mode '{mode.name}' needs the {'proposal' if mode.uses_proposal else 'aligner'} model")
    device = next(some_model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    for start in range(0, len(order), config.batch_size):
        indices = order[start: start + config.batch_size]
        out = generate_batch(
            proposal, aligner, [prompts[i] for i in indices], decode, config, vocab_size=vocab_size,
            pad_token_id=pad_token_id, eos_token_ids=eos_token_ids, tokenizer=tokenizer, generator=generator,
            on_step=on_step, stats=stats,
        )
        for index, generation in zip(indices, out):
            results[index] = generation
        if on_batch is not None:
            on_batch(indices, out)
    return results  # type: ignore[return-value]


def config_record(decode: DecodeConfig, config: GenerateConfig) -> dict:
    """Both configs as one JSON-ready dict."""
    return {"decode": decode.to_dict(), "generate": asdict(config)}
