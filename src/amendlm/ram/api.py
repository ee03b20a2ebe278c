"""Python API of RAM decoding: a ``generate``-shaped wrapper and a transformers ``LogitsProcessor``.

>>> ram = ResidualAlignedLM.from_pretrained("smollm2-135m-instruct", "runs/aligner/aligner")
>>> ram.generate_text(["Summarize: ..."], mode="par-kl", max_new_tokens=48)[0].text

Inside a plain ``proposal.generate`` (proposal logits come from ``generate``; the aligner is stepped
by the processor with its own KV cache):

>>> processor = RAMLogitsProcessor(aligner, DecodeConfig(mode="par"), vocab_size=len(tokenizer),
...                                attention_mask=batch["attention_mask"], eos_token_id=tokenizer.eos_token_id)
>>> proposal.generate(**batch, logits_processor=[processor], do_sample=False, max_new_tokens=32)

For sampling through ``generate`` pass ``do_sample=True, temperature=1.0, top_p=1.0, top_k=0`` so that
transformers' own warpers leave the rule's distribution unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from amendlm.modeling import eval_mode, pad_token_id
from amendlm.ram.data import encode_prompt
from amendlm.ram.decoding import DecodeConfig, apply_rule
from amendlm.ram.generate import CachedLM, Generation, GenerateConfig, GenerationStats, generate, shared_vocab_size


def check_model_name(name: str, option: str = "--model") -> None:
    """Refuse, before anything loads, a model name that cannot load: a missing local directory or GGUF
    file, a directory without ``config.json``, or (offline) a hub id that is not in the local cache.

    Embedded names pass; a hub id passes when online (transformers downloads it).

    Raises:
        FileNotFoundError / ValueError: one line naming ``option`` and the value.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    from amendlm.resources import MODELS, _is_local_path

    path = Path(name).expanduser()
    if name in MODELS:
        return
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"{option} {name}: no such GGUF file")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            hint = ("; an align train run without aligner/ yet (unfinished: rerun 'align train' with the same options)"
                    if (path / "train_config.json").is_file() else "")
            raise FileNotFoundError(f"{option} {name}: not a model directory (no config.json){hint}")
    elif path.exists():
        raise ValueError(f"{option} {name}: not a model directory or .gguf file")
    elif _is_local_path(name):
        raise FileNotFoundError(f"{option} {name}: no such model directory (embedded models: {', '.join(sorted(MODELS))})")
    elif constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise FileNotFoundError(f"{option} {name}: no such local directory, and not in the Hugging Face cache (offline)")


def resolve_aligner(name: str | Path | None, option: str = "--aligner") -> str | None:
    """Where an aligner's weights are, checked without loading anything: the one resolver of every
    command that takes an aligner (``align train``/``eval``/``generate``, ``eval --aligner``, the
    Python API).

    An ``align train`` run directory (no ``config.json`` of its own, its trained model in
    ``aligner/``) becomes ``RUN/aligner``; anything else (an aligner directory, a ``.gguf`` file, an
    embedded name, a hub id) is returned as given, after :func:`check_model_name`.

    Args:
        name: as the user gave it (``str`` or ``Path``); ``None`` stays ``None`` (no aligner).
        option: the command-line option named in an error (``--aligner``, ``--finetuned``).

    Returns:
        The path or name :func:`amendlm.modeling.load_model` should be given, as ``str``.

    Raises:
        FileNotFoundError / ValueError: one line naming ``option`` and the value (a missing path, a
            directory that holds no model, an unfinished run; see :func:`check_model_name`).
    """
    if name is None:
        return None
    mapped = aligner_path(name)
    if mapped != str(name):
        return mapped
    check_model_name(str(name), option)
    return str(name)


def aligner_path(name: str | Path) -> str:
    """Where an aligner's weights are, without checking that they exist: an ``align train`` run
    directory (no ``config.json`` of its own, its trained model in ``aligner/``) becomes
    ``RUN/aligner``; anything else is returned as given.  For records that must be compared before
    the aligner is (re)made; :func:`resolve_aligner` is the checked form.
    """
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "aligner" / "config.json").is_file():
        return str(Path(name) / "aligner")
    return str(name)


class ResidualAlignedLM:
    """A frozen proposal ``P_M`` and an aligner ``Q`` decoded together as ``P_M * Q / Z``.

    Args:
        proposal, aligner: causal LMs with the same tokenizer (``aligner`` may be ``None`` for
            ``mode="proposal"``).
        tokenizer: the shared tokenizer.
        decode: default rule parameters (:class:`DecodeConfig`); overridable per call.
        proposal_name, aligner_name: used in error messages.
        aligner_tokenizer: checked against ``tokenizer`` when given.

    Raises:
        ValueError: the two vocabularies differ (names both models).
    """

    def __init__(self, proposal, aligner, tokenizer, decode: DecodeConfig | None = None, *,
                 proposal_name: str = "proposal", aligner_name: str = "aligner", aligner_tokenizer=None):
        self.proposal, self.aligner, self.tokenizer = proposal, aligner, tokenizer
        self.decode = decode or DecodeConfig()
        self.vocab_size = shared_vocab_size(tokenizer, aligner_tokenizer or tokenizer, proposal_name, aligner_name,
                                            proposal, aligner)
        self.pad_token_id = pad_token_id(tokenizer)
        self.eos_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    @classmethod
    def from_pretrained(cls, proposal: str, aligner: str | None, decode: DecodeConfig | None = None,
                        device: str = "cpu", proposal_adapter: str | None = None, aligner_adapter: str | None = None):
        """Load both models (embedded name, local directory or hub id) and check their vocabularies.

        ``aligner`` may be an ``align train`` run directory (its ``aligner/`` is loaded).  Both names are
        checked before either model loads (:func:`check_model_name`).
        """
        from amendlm.modeling import load_model

        check_model_name(proposal, "--proposal")
        aligner = resolve_aligner(aligner)

        proposal_model, tokenizer = load_model(proposal, adapter=proposal_adapter, device=device)
        aligner_model, aligner_tokenizer = (None, None)
        if aligner is not None:
            aligner_model, aligner_tokenizer = load_model(aligner, adapter=aligner_adapter, device=device)
        return cls(proposal_model, aligner_model, tokenizer, decode, proposal_name=proposal,
                   aligner_name=aligner or "none", aligner_tokenizer=aligner_tokenizer)

    def _decode(self, mode: str | None, overrides: dict) -> DecodeConfig:
        decode = self.decode if mode is None else replace(self.decode, mode=mode)
        return replace(decode, **overrides) if overrides else decode

    def generate_ids(self, prompts: Sequence[Sequence[int]], mode: str | None = None,
                     config: GenerateConfig | None = None, stats: GenerationStats | None = None,
                     on_step=None, on_batch=None, **decode_overrides) -> list[Generation]:
        """Decode token-id prompts; see :func:`amendlm.ram.generate.generate`."""
        return generate(self.proposal, self.aligner, prompts, self._decode(mode, decode_overrides), config,
                        vocab_size=self.vocab_size, pad_token_id=self.pad_token_id, eos_token_ids=self.eos_token_ids,
                        tokenizer=self.tokenizer, stats=stats, on_step=on_step, on_batch=on_batch)

    def generate_text(self, prompts: Sequence[str], mode: str | None = None, chat_template: bool | None = None,
                      config: GenerateConfig | None = None, **decode_overrides) -> list[Generation]:
        """Decode text prompts (chat template applied when the tokenizer has one)."""
        ids = [encode_prompt(self.tokenizer, p, chat_template) for p in prompts]
        return self.generate_ids(ids, mode, config, **decode_overrides)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 64,
                 do_sample: bool = True, seed: int = 0, mode: str | None = None, **decode_overrides) -> torch.Tensor:
        """``model.generate``-shaped: ``(batch, seq_len)`` prompts (left or right padded) ->
        ``(batch, seq_len + new)`` long tensor, prompts as given followed by new tokens, padded with pad."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        config = GenerateConfig(max_new_tokens=max_new_tokens, greedy=not do_sample, seed=seed, batch_size=len(prompts))
        out = self.generate_ids(prompts, mode, config, **decode_overrides)
        width = max((len(g.token_ids) for g in out), default=0)
        new = torch.full((len(out), width), self.pad_token_id, dtype=torch.long)
        for row, generation in enumerate(out):
            new[row, : len(generation.token_ids)] = torch.tensor(generation.token_ids, dtype=torch.long)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=-1)


try:  # transformers is a dependency; the base class only adds the interface
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover
    _LogitsProcessorBase = object


class RAMLogitsProcessor(_LogitsProcessorBase):
    """RAM as a transformers ``LogitsProcessor``: ``scores`` are the proposal's logits, the aligner is run here.

    The processor keeps the aligner's KV cache across calls of one ``generate``: the first call
    prefills it with the whole (left-padded) prompt, later calls feed the one new token.  Use a
    fresh processor for every ``generate`` call.

    The aligner runs in eval mode (dropout off) inside every call and gets its own train/eval modes
    back before the call returns (:func:`amendlm.modeling.eval_mode`), like every other scoring and
    decoding entry point; the proposal's mode is ``generate``'s caller's business.

    Args:
        aligner: the aligner causal LM.
        decode: rule parameters; ``mode`` must use both models or the aligner alone.
        vocab_size: shared tokenizer length; columns beyond it are returned as ``-inf``.
        attention_mask: ``(batch, prompt_len)`` mask of the prompts given to ``generate``
            (``None`` = no padding).
        eos_token_id: for PAR's EOS priority.
        generator: random source for ``sir``.
    """

    def __init__(self, aligner, decode: DecodeConfig, vocab_size: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None, dtype=torch.float32):
        self.runner = CachedLM(aligner, vocab_size, dtype)
        self.decode, self.vocab_size, self.eos_token_id, self.generator = decode, vocab_size, eos_token_id, generator
        self.prompt_mask = attention_mask
        self.seen_len = 0

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``(batch, seq_len)`` so far, ``scores`` ``(batch, >= vocab)`` proposal logits ->
        rule logits of the same shape."""
        with eval_mode(self.runner.model):
            if self.seen_len == 0:
                mask = self.prompt_mask if self.prompt_mask is not None else torch.ones_like(input_ids)
                aligner_logits = self.runner.prefill(input_ids, mask)
            elif input_ids.shape[1] == self.seen_len + 1:
                aligner_logits = self.runner.step(input_ids[:, -1])
            else:
                raise RuntimeError("RAMLogitsProcessor saw a non-incremental sequence; use one processor per generate call")
        self.seen_len = input_ids.shape[1]
        proposal_logits = scores[:, : self.vocab_size].float()
        rule = apply_rule(proposal_logits, aligner_logits.to(proposal_logits.device), self.decode,
                          eos_token_id=self.eos_token_id, generator=self.generator)
        out = torch.full_like(scores, float("-inf"), dtype=rule.dtype)
        out[:, : self.vocab_size] = rule
        return out.to(scores.dtype)
