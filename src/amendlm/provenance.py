"""Which exact weights an evaluation scored: SHA-256 hashes of the model's and the adapter's files.

A results file that names its model and adapter by path only cannot prove what it scored (the
directory may since have been retrained or overwritten).  :func:`weights_record` hashes the files
the weights came from (cached by path, size and mtime, :func:`amendlm.resources.cached_file_sha256`)
and, for a model that did not come from files, the tensors themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from amendlm.resources import GGUF_SOURCE, cached_file_sha256

# the files that decide a model's outputs: weights and the config that builds the modules
MODEL_FILE_PATTERNS = ("*.safetensors", "*.bin", "config.json")
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


def state_sha256(model) -> str:
    """SHA-256 over every parameter and buffer of ``model`` (name, dtype, shape and bytes, in state-dict order).

    Identifies in-memory weights that came from no file (e.g. a model built or changed in a script).
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_record(model) -> dict:
    """What an evaluation record stores to identify the scored weights.

    Uses ``model.amendlm_sources`` (set by :func:`amendlm.modeling.load_model`), else the model's
    ``name_or_path`` and, for a PEFT model, no adapter directory (its weights are then covered by
    ``state_sha256``).

    Returns:
        ``{"model": {"path", "files": {name: sha256}, "gguf": {...} | None} | None,
        "adapter": {"path", "files": {...}} | None, "state_sha256": str | None}`` — the file hashes
        where the weights came from files, else ``state_sha256`` over the in-memory tensors.
    """
    sources = getattr(model, "amendlm_sources", None) or {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_path = sources.get("model_path") or getattr(base, "name_or_path", None)
    directory = model_directory(str(model_path)) if model_path else None
    files = files_sha256(directory, MODEL_FILE_PATTERNS) if directory is not None else {}
    record: dict = {"model": None, "adapter": None, "state_sha256": None}
    if files:
        gguf_file = directory / GGUF_SOURCE
        gguf = json.loads(gguf_file.read_text()) if gguf_file.is_file() else None
        record["model"] = {"path": str(directory), "files": files, "gguf": gguf}
    adapter = sources.get("adapter")
    if adapter is not None:
        record["adapter"] = {"path": str(adapter), "files": files_sha256(adapter, ADAPTER_FILE_PATTERNS)}
    is_peft = base is not model
    if not files or (is_peft and adapter is None):
        record["state_sha256"] = state_sha256(model)
    return record
