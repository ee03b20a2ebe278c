"""The model passes of one unlearning step: policy and reference outputs of every stream.

:class:`StepPasses` turns one global batch of every stream into the ``(batch,)`` records a
method's loss reads (:class:`~amendlm.unlearn.methods.StreamOutput`), gathered across
processes (:mod:`amendlm.distributed`).  Two ways, chosen by ``UnlearnConfig.packing``:

* **padded** (``packing=False``, the behaviour of every run recorded before packing existed):
  each stream right-padded to its longest example; a reference pass and a policy pass per stream.
* **packed** (``packing=True``): every stream's examples of the step in one set of packed rows
  (:mod:`amendlm.unlearn.packing`), so one policy pass and at most one reference pass per step
  with almost no padding; DPO's chosen and rejected continuation of one context share their
  prefix.  The per-sequence reference log-probs of the forget and pair streams are computed once
  per example (:mod:`amendlm.unlearn.reference_cache`); the ``kl`` stream's reference pass still
  runs every step (the KL needs the reference's whole distribution).  Where the attention kernel
  cannot take the block mask (:func:`~amendlm.unlearn.packing.packing_unsupported`), the passes
  fall back to one padded batch per stream, the cache kept; :attr:`StepPasses.fallback` says why.

Both give the same losses and gradients up to float rounding (``tests/test_unlearn_packing.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from amendlm.distributed import gather_rows, split_rows, zero_anchor
from amendlm.modeling import autocast
from amendlm.scoring import EncodedPair, sequence_logps, token_logps
from amendlm.unlearn import losses, models
from amendlm.unlearn.methods import Method, StreamOutput
from amendlm.unlearn.packing import ROW_TOKENS, PackedLayout, pack_examples, packing_unsupported, padded_layout
from amendlm.unlearn.reference_cache import ReferenceCache
from amendlm.unlearn.streams import PAIRED_STREAMS, collate_stream

Entry = tuple[str, int]  # (stream, index in the stream's local share)


class StepPasses:
    """The policy and reference passes of an unlearning run.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (device, processes, unwrapping).
        model: the prepared policy (train mode; a PEFT model with LoRA).
        reference_model: a frozen copy (``reference="copy"``) or None (the adapter-disabled policy).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (autocast).
        pad_id: padding token id.
        method: the method, whose ``streams`` / ``reference_streams`` are run.
        packing: packed rows and cached reference log-probs (see the module docstring).
        row_tokens: packed row budget (:data:`~amendlm.unlearn.packing.ROW_TOKENS`).
        max_tokens: the longest example (``UnlearnConfig.max_length``), checked against a sliding window.
    """

    def __init__(self, accelerator, model, reference_model, dtype: torch.dtype, pad_id: int, method: Method,
                 packing: bool = False, row_tokens: int = ROW_TOKENS, max_tokens: int | None = None):
        self.accelerator, self.model, self.reference_model = accelerator, model, reference_model
        self.dtype, self.pad_id, self.method, self.row_tokens = dtype, pad_id, method, row_tokens
        unwrapped = accelerator.unwrap_model(model)
        reasons = [packing_unsupported(m, max_tokens) for m in (unwrapped, reference_model) if m is not None] if packing else []
        self.fallback: str | None = next((r for r in reasons if r), None)
        self.packed = packing and self.fallback is None
        self.cache = ReferenceCache() if packing else None
        self.cached_streams = tuple(s for s in method.reference_streams if s != "kl") if packing else ()
        self.mask_dtype = next(unwrapped.parameters()).dtype
        self.head_only = packing  # the output head on the scored positions only (see scored_logits)

    # ------------------------------------------------------------------ the padded passes (packing off)
    def reference_logits(self, inputs: dict) -> torch.Tensor:
        """``(batch, seq_len, vocab)`` reference logits (:func:`amendlm.unlearn.models.reference_logits`)."""
        return models.reference_logits(self.accelerator.unwrap_model(self.model), inputs, self.dtype, self.reference_model)

    def stream_output(self, name: str, batch: list[EncodedPair]) -> StreamOutput:
        """One stream's padded batch through the reference (if the method needs it) and the policy."""
        inputs = {k: v.to(self.accelerator.device) for k, v in collate_stream(batch, self.pad_id).items()}
        loss_mask = inputs.pop("loss_mask")
        reference_logits = self.reference_logits(inputs) if name in self.method.reference_streams else None
        with autocast(self.dtype, self.accelerator.device):
            policy_logits = self.model(**inputs, use_cache=False).logits
        policy_logps, n_tokens = sequence_logps(policy_logits, inputs["input_ids"], loss_mask)
        reference_logps = None if reference_logits is None else sequence_logps(reference_logits, inputs["input_ids"], loss_mask)[0]
        kl_sums = losses.kl_sums(policy_logits, reference_logits, loss_mask) if name == "kl" else None
        return StreamOutput(policy_logps, n_tokens, reference_logps, kl_sums)

    # ------------------------------------------------------------------ the step
    def global_outputs(self, batches: dict[str, list[EncodedPair]]) -> tuple[dict[str, StreamOutput], torch.Tensor | float]:
        """Run this process's share of every global batch and gather the global ``(batch,)`` outputs.

        Returns the outputs and a zero term to add to the loss (it keeps a placeholder share, run
        when the global batch has fewer rows than processes, in the backward pass).  With packing,
        the reference log-probs of the global batch's forget / pair examples are stored in
        :attr:`cache` afterwards (the same in every process).
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        shares, placeholders = {}, {}
        for name, batch in batches.items():
            shares[name], placeholders[name] = split_rows(batch, world, rank)
        if self.cache is None:
            local = {name: self.stream_output(name, share) for name, share in shares.items()}
        else:
            local = self.laid_out_outputs(shares)
        outputs, anchor = {}, 0.0
        for name, batch in batches.items():
            out = local[name]
            if placeholders[name]:
                anchor = anchor + zero_anchor([out.policy_logps, out.kl_sums])
                out = out.map(lambda t: t[:0])
            outputs[name] = out.map(lambda t: gather_rows(t, len(batch), self.accelerator))
        for name in self.cached_streams:
            self.cache.store(batches[name], outputs[name].reference_logps.tolist())
        return outputs, anchor

    # ------------------------------------------------------------------ the packed passes
    def _chunks(self, entries: list[Entry]) -> list[list[Entry]]:
        """Packed: all entries in one layout; the padded fallback: one per stream (each padded to its own longest)."""
        if self.packed or not entries:
            return [entries] if entries else []
        return [[e for e in entries if e[0] == name] for name in dict.fromkeys(name for name, _ in entries)]

    def _layout(self, shares: dict[str, list[EncodedPair]], entries: list[Entry]) -> PackedLayout:
        items = [shares[name][i] for name, i in entries]
        if not self.packed:
            return padded_layout(items, self.pad_id).to(self.accelerator.device)
        # a DPO pair's two sides share their context
        layout = pack_examples(items, self.pad_id, pair_groups(entries), self.row_tokens, self.mask_dtype)
        return layout.to(self.accelerator.device)

    def laid_out_outputs(self, shares: dict[str, list[EncodedPair]]) -> dict[str, StreamOutput]:
        """Every stream's local share through (at most) one reference and one policy pass.

        Args:
            shares: this process's examples of each stream (the order of ``method.streams``).

        Returns:
            ``{stream: StreamOutput}`` of ``(len(share),)`` tensors, as :meth:`stream_output` gives.
        """
        device = self.accelerator.device
        reference = {name: [None] * len(shares[name]) for name in shares if name in self.method.reference_streams}
        for name in self.cached_streams:
            reference[name] = self.cache.lookup(shares[name])
        needed = [(name, i) for name, values in reference.items() for i, v in enumerate(values) if v is None]
        kl_reference = []  # (n_scored, vocab) reference logits of the kl stream's scored tokens, canonical order
        for chunk in self._chunks(needed):
            layout = self._layout(shares, chunk)
            logits = self.scored_logits(self.reference_logits, layout, self.reference_model)
            sums = layout.per_example(token_logps(logits, layout.targets)).tolist()
            for (name, i), value in zip(chunk, sums):
                reference[name][i] = value
            kl = [j for j, (name, _) in enumerate(chunk) if name == "kl"]
            if kl:
                kl_reference.append(logits[layout.token_slice(kl[0], kl[-1] + 1)])
        entries = [(name, i) for name, share in shares.items() for i in range(len(share))]
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per chunk: logps, counts, KL sums
        for chunk in self._chunks(entries):
            layout = self._layout(shares, chunk)
            logits = self.scored_logits(self._policy_logits, layout)
            kl = [j for j, (name, _) in enumerate(chunk) if name == "kl"]
            kl_sums = torch.zeros(len(chunk), dtype=torch.float32, device=device)  # (chunk,), 0 but on kl examples
            if kl:
                tokens = layout.token_slice(kl[0], kl[-1] + 1)
                kl_sums = layout.per_example(losses.token_kl(logits[tokens], torch.cat(kl_reference)), tokens)
            parts.append((layout.per_example(token_logps(logits, layout.targets)), layout.n_tokens(), kl_sums))
        policy_logps, n_tokens, kl_sums = (torch.cat([p[k] for p in parts]) for k in range(3))
        outputs, begin = {}, 0
        for name, share in shares.items():
            end = begin + len(share)
            outputs[name] = StreamOutput(
                policy_logps[begin:end], n_tokens[begin:end],
                torch.tensor(reference[name], dtype=torch.float32, device=device) if name in reference else None,
                kl_sums[begin:end] if name == "kl" else None)
            begin = end
        return outputs

    def _policy_logits(self, inputs: dict) -> torch.Tensor:
        with autocast(self.dtype, self.accelerator.device):
            return self.model(**inputs, use_cache=False).logits

    def scored_logits(self, run: Callable[[dict], torch.Tensor], layout: PackedLayout, model=None) -> torch.Tensor:
        """``(n_scored, vocab)`` logits of the scored tokens (canonical order) from ``run(layout.inputs)``.

        The output head (``get_output_embeddings()``, e.g. a 49,152 x 576 matrix: a fifth of
        SmolLM2-135M's FLOPs per token) is run on the predicting positions only: a forward
        pre-hook hands it those hidden states, ``(1, n_positions, d_model)``, instead of
        ``(rows, width, d_model)``.  A model whose head is not called as that module, or whose
        logits do not come out as ``(1, n_positions, vocab)``, gets the full logits instead, from
        then on (the same values; a shared prefix's last position predicts a token of each member,
        so positions may repeat in the canonical order).

        Args:
            run: the pass, ``inputs -> logits`` (the policy's, or :meth:`reference_logits`).
            layout: its inputs and scored positions.
            model: the module whose head runs (default: the unwrapped policy).
        """
        head = None
        if self.head_only:
            owner = model if model is not None else self.accelerator.unwrap_model(self.model)
            head = getattr(owner, "get_output_embeddings", lambda: None)()
        if head is None:
            return layout.scored(run(layout.inputs))
        width = layout.inputs["input_ids"].shape[1]
        positions, inverse = torch.unique(layout.rows * width + layout.cols, return_inverse=True)
        fired = []

        def select(module, args):  # (rows, width, d_model) -> (1, n_positions, d_model)
            fired.append(True)
            return (args[0][positions // width, positions % width].unsqueeze(0), *args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            logits = run(layout.inputs)
        finally:
            handle.remove()
        if fired == [True] and tuple(logits.shape[:2]) == (1, len(positions)):
            return logits[0][inverse]
        self.head_only = False
        return layout.scored(logits) if not fired else layout.scored(run(layout.inputs))

def pair_groups(entries: Sequence[Entry]) -> list[list[int]]:
    """A partition of ``range(len(entries))``: ``("chosen", i)`` and ``("rejected", i)`` (one DPO pair,
    the same context) together, every other entry alone."""
    position = {entry: j for j, entry in enumerate(entries)}
    groups, seen = [], set()
    for j, (name, i) in enumerate(entries):
        if j in seen:
            continue
        other = position.get((PAIRED_STREAMS[1 - PAIRED_STREAMS.index(name)], i)) if name in PAIRED_STREAMS else None
        groups.append([j] if other is None else [j, other])
        seen.update(groups[-1])
    return groups
