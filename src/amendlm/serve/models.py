"""What a server can be asked for: one proposal model alone and each ``model+NAME`` pair with an aligner.

Every pair shares the one proposal object loaded once (``ServedModel.proposal`` is the same
module for all of them), so memory is one proposal plus the aligners, however many are served.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from amendlm.modeling import pad_token_id
from amendlm.ram.decoding import DecodeConfig
from amendlm.ram.generate import shared_vocab_size

# config fields that hold a model's context length, in the order transformers' families use them
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass
class ServedModel:
    """One servable id: the proposal alone (``aligner is None``) or proposal x aligner.

    Attributes:
        id: the name clients put in ``model`` (``M`` or ``M+NAME``).
        proposal, aligner: causal LMs in eval mode (``aligner`` None for the model alone).
        tokenizer: the shared tokenizer (chat template, stop strings, text).
        decode: the server's default rule parameters for this id (mode ``proposal`` for the model alone).
        context_length: tokens of prompt + completion at most (the smaller of the two models').
        vocab_size, pad_token_id, eos_token_ids: as :func:`amendlm.ram.generate.decode_steps` needs them.
        source: where the weights came from (model path, adapter, aligner path), for ``/v1/models``.
    """

    id: str
    proposal: object
    aligner: object | None
    tokenizer: object
    decode: DecodeConfig
    context_length: int
    vocab_size: int
    pad_token_id: int
    eos_token_ids: list[int]
    source: dict


def context_length(model) -> int:
    """The longest sequence ``model`` takes, from its config.

    Raises:
        ValueError: the config names no context length (names the fields looked at).
    """
    config = model.config
    for field in _CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"model config has none of {', '.join(_CONTEXT_FIELDS)}: cannot bound prompt + max_tokens")


def build_served(name: str, proposal, tokenizer, aligners: dict[str, tuple[object, object]],
                 decode: DecodeConfig, source: dict | None = None) -> dict[str, ServedModel]:
    """The served ids for one proposal and named aligners (already loaded).

    Args:
        name: id of the proposal alone; pairs are ``name+ALIGNER``.
        aligners: ``{aligner name: (model, tokenizer)}``.
        decode: default rule parameters of the pairs (the model alone always uses mode ``proposal``).
        source: recorded per id under ``source`` (e.g. ``{"model": path, "adapter": dir}``).

    Raises:
        ValueError: an aligner name is empty or has ``+``; an aligner's vocabulary differs from the proposal's.
    """
    source = dict(source or {})
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    common = dict(tokenizer=tokenizer, pad_token_id=pad_token_id(tokenizer), eos_token_ids=eos)
    served = {name: ServedModel(name, proposal, None, decode=replace(decode, mode="proposal"),
                                context_length=context_length(proposal), vocab_size=len(tokenizer),
                                source=source, **common)}
    for aligner_name, (aligner, aligner_tokenizer) in aligners.items():
        if not aligner_name or "+" in aligner_name:
            raise ValueError(f"aligner name {aligner_name!r} must be non-empty and without '+'")
        vocab = shared_vocab_size(tokenizer, aligner_tokenizer, name, aligner_name, proposal, aligner)
        pair = f"{name}+{aligner_name}"
        served[pair] = ServedModel(pair, proposal, aligner, decode=decode,
                                   context_length=min(context_length(proposal), context_length(aligner)),
                                   vocab_size=vocab, source={**source, "aligner": aligner_name}, **common)
    return served


def parse_aligner_option(value: str) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; a bare embedded model name (:data:`amendlm.resources.MODELS`)
    is named after itself, and a bare ``DIR`` that exists here (a directory or a ``.gguf`` file) after
    its last path part.  Only the format is checked (and, for a bare value, that it is local: an
    embedded name or a local path): :func:`amendlm.ram.api.resolve_aligner` checks what ``DIR`` holds.

    Raises:
        ValueError: empty name or path, a name with ``+``, or a value without ``=`` that is neither an
            embedded model name nor a local directory or ``.gguf`` file (taken as a hub id it would only
            fail after the hub's retries).
    """
    from amendlm.resources import MODELS

    name, sep, path = value.partition("=")
    if not sep:
        if value in MODELS:
            return value, value
        local = Path(value).expanduser()
        if not (local.is_dir() or (local.is_file() and local.suffix.lower() == ".gguf")):
            raise ValueError(f"--aligner {value}: expected NAME=DIR (e.g. small=runs/ram/small8), or alone an "
                             f"embedded model name ({', '.join(sorted(MODELS))}) or an existing aligner directory "
                             "or .gguf file")
        name, path = Path(value.rstrip("/")).name, value
    if not name or not path or "+" in name:
        raise ValueError(f"--aligner {value}: expected NAME=DIR with a NAME without '+'")
    return name, path


def load_served(model: str, adapter: str | None, aligners: dict[str, str], decode: DecodeConfig,
                name: str | None = None, device: str = "cpu", trust_remote_code: bool = False) -> dict[str, ServedModel]:
    """Load the proposal (with its adapter, if any) once and every aligner, and build the served ids.

    Raises:
        FileNotFoundError, ValueError, OSError: as :func:`amendlm.modeling.load_model`, or an aligner
            whose vocabulary differs from the proposal's.
    """
    from amendlm.modeling import load_model
    from amendlm.resources import resolve_model

    for path in aligners.values():  # a wrong local aligner path fails before the proposal is loaded
        resolve_model(path)
    proposal, tokenizer = load_model(model, adapter=adapter, device=device, trust_remote_code=trust_remote_code)
    loaded = {aligner_name: load_model(path, device=device, trust_remote_code=trust_remote_code)
              for aligner_name, path in aligners.items()}
    source = {"model": model, "adapter": str(adapter) if adapter else None}
    return build_served(name or model, proposal, tokenizer, loaded, decode, source)
