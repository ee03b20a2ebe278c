"""GGUF checkpoints: the tensor-type check and the conversion to an fp32 safetensors model.

Used by :func:`amendlm.resources.resolve_model` for embedded models and local ``.gguf`` files
(the conversion is staged and renamed into place there).  transformers' own GGUF loader does the
dequantisation; this module only checks the types first and re-saves the result.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors model + tokenizer in ``out_dir``.

    Raises:
        ValueError: a tensor type the GGUF loader cannot dequantise (names it and the supported
            ones), or an architecture or file transformers cannot load (its own first line).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_types(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{gguf_path}: transformers cannot load this GGUF file: {first}") from err
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF-loaded model itself is not serialisable
    config.name_or_path = str(out_dir)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied lm_head may be absent from the GGUF state dict; anything else is a real mismatch
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@functools.lru_cache(maxsize=None)
def gguf_supported_types() -> tuple[str, ...]:
    """Names of the GGUF tensor types that ``gguf.dequantize`` (what transformers' GGUF loader calls) handles.

    Probed on one zero block of each type, so the list follows the installed ``gguf`` version.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    supported = []
    for qtype in GGMLQuantizationType:
        _, type_size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except Exception:  # noqa: BLE001 - any failure means the loader cannot read the type
            continue
        supported.append(qtype.name)
    return tuple(supported)


def check_gguf_types(gguf_path: str | os.PathLike) -> None:
    """Fail early, naming the type, when a GGUF file holds a tensor type the loader cannot dequantise.

    Raises:
        ValueError: ``"FILE: GGUF quantisation type Q8_K (tensor 'x') is not supported by
            transformers' GGUF loader; supported: ..."``, or an unreadable file.
    """
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({err})") from err
    supported = gguf_supported_types()
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in supported:
            raise ValueError(
                f"{gguf_path}: GGUF quantisation type {tensor.tensor_type.name} (tensor '{tensor.name}') is not "
                f"supported by transformers' GGUF loader; supported: {', '.join(supported)}"
            )
