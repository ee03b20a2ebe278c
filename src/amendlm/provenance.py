"""Which exact weights an evaluation scored: SHA-256 hashes of the model's and the adapter's files.

A results file that names its model and adapter by path only cannot prove what it scored (the
directory may since have been retrained or overwritten).  :func:`weights_record` hashes the files
the weights came from (cached by path, size and mtime, :func:`amendlm.resources.cached_file_sha256`),
for a model that did not come from files the tensors themselves, and the tensors a caller may
have changed in memory since loading (trainable parameters, a PEFT model's adapter).

What the file hashes prove and what they do not: they identify the files on disk at the time of
the record (so a directory retrained or overwritten since is told apart), not the tensors in
memory.  Weights changed after :func:`amendlm.modeling.load_model` (a fine-tuning step, an
adapter trained further, an in-place edit) are covered only by ``trainable_sha256``, which hashes
the in-memory tensors that can have been trained: every parameter with ``requires_grad`` and a
PEFT model's adapter tensors.  A frozen parameter (``requires_grad=False``) edited in place
outside a PEFT adapter is not detected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from amendlm.resources import GGUF_SOURCE, cached_file_sha256

# the files that decide a model's outputs: weights and the config that builds the modules
MODEL_FILE_PATTERNS = ("*.safetensors", "config.json")  # loading reads safetensors only
ADAPTER_FILE_PATTERNS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")


def files_sha256(directory: str | Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """``{file name: sha256}`` of the files in ``directory`` matching ``patterns``, names sorted.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    names = sorted({p.name for pattern in patterns for p in directory.glob(pattern) if p.is_file()})
    return {name: cached_file_sha256(directory / name) for name in names}


def model_directory(model_path: str) -> Path | None:
    """The local directory holding ``model_path``'s files: itself, or a hub id's cached snapshot (None if neither)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(model_path), "config.json")
    except ValueError:  # not a hub id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def tensors_sha256(named_tensors) -> str:
    """SHA-256 over ``(name, tensor)`` pairs: each name, dtype, shape and bytes, in the given order."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().cpu().reshape(-1).contiguous()  # 0-dim tensors cannot be viewed as bytes
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def state_sha256(model) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (name, dtype, shape and bytes, in state-dict order).

    Identifies in-memory weights that came from no file (e.g. a model built or changed in a script).
    """
    return tensors_sha256(model.state_dict().items())


def trainable_sha256(model) -> str | None:
    """SHA-256 of the tensors of ``model`` that can have changed since loading, or None if there are none.

    For a PEFT model: its adapter tensors (``get_peft_model_state_dict``, trainable or not) and any
    other parameter with ``requires_grad``; for any other model: every parameter with
    ``requires_grad`` (for a model as :func:`amendlm.modeling.load_model` returns it that is every
    parameter, so this costs one pass over the weights).
    """
    named: dict = {}
    if hasattr(model, "get_base_model"):
        from peft import get_peft_model_state_dict

        named.update(get_peft_model_state_dict(model))
        named.update({name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name})
    else:
        named.update({name: p for name, p in model.named_parameters() if p.requires_grad})
    return tensors_sha256(sorted(named.items(), key=lambda item: item[0])) if named else None


def weights_record(model) -> dict:
    """What an evaluation record stores to identify the scored weights.

    Uses ``model.amendlm_sources`` (set by :func:`amendlm.modeling.load_model`), else the model's
    ``name_or_path`` and, for a PEFT model, no adapter directory.  See the module docstring for
    what the file hashes do and do not prove.

    Returns:
        ``{"model": {"path", "files": {name: sha256}, "gguf": {...} | None} | None,
        "adapter": {"path", "files": {...}} | None, "state_sha256": str | None,
        "trainable_sha256": str | None}``: the file hashes where the weights came from files;
        ``state_sha256`` over every in-memory tensor where the base model came from no file;
        otherwise ``trainable_sha256`` (:func:`trainable_sha256`) over the tensors that can have
        changed in memory since loading (for a PEFT model with no adapter directory, its adapter
        tensors only, not the whole state).
    """
    sources = getattr(model, "amendlm_sources", None) or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_path = sources.get("model_path") or getattr(base, "name_or_path", None)
    directory = model_directory(str(model_path)) if model_path else None
    files = files_sha256(directory, MODEL_FILE_PATTERNS) if directory is not None else {}
    record: dict = {"model": None, "adapter": None, "state_sha256": None, "trainable_sha256": None}
    if files:
        gguf_file = directory / GGUF_SOURCE
        gguf = json.loads(gguf_file.read_text()) if gguf_file.is_file() else None
        record["model"] = {"path": str(directory), "files": files, "gguf": gguf}
    adapter = sources.get("adapter")
    if adapter is not None:
        record["adapter"] = {"path": str(adapter), "files": files_sha256(adapter, ADAPTER_FILE_PATTERNS)}
    if not files:
        record["state_sha256"] = state_sha256(model)  # covers the trainable tensors too
    else:
        record["trainable_sha256"] = trainable_sha256(model)
    return record
