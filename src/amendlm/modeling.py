"""Loading causal LMs and tokenizers, precision handling, and PEFT adapters.

Every command goes through :func:`load_model` so that embedded names, local paths and hub ids
behave alike, weights are read as safetensors, and remote code is never trusted by default.
Attaching an adapter lives in :mod:`amendlm.adapters` (:func:`attach_adapter`, re-exported here).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import torch

from amendlm.adapters import attach_adapter, check_adapter_dir  # noqa: F401  re-exported: amendlm.modeling.attach_adapter
from amendlm.resources import resolve_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
AUTO_DTYPE = "auto"
# "auto" picks bf16 on a CPU only if bf16 autocast matmuls beat fp32 by this factor: below it the
# ~1e-2 bf16 noise is not worth the time saved (CPUs without bf16 units emulate it, often slower).
BF16_MIN_SPEEDUP = 1.3


def parse_dtype(name: str) -> torch.dtype | None:
    """Validate a dtype name: ``"fp32"|"float32"|"bf16"|"bfloat16"`` -> a torch dtype; ``"auto"`` -> None.

    ``"auto"`` depends on the device, so code that needs the dtype calls :func:`resolve_dtype`;
    this function serves to validate names (e.g. in a config's ``__post_init__``).

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name == AUTO_DTYPE:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; choose one of {sorted([*DTYPES, AUTO_DTYPE])}") from None


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype named ``name`` on ``device``; ``"auto"`` is bf16 where it is natively fast.

    ``"auto"``: bfloat16 on a CUDA device with native bf16 (``torch.cuda.is_bf16_supported``,
    emulation excluded) and on a CPU whose bf16 autocast matmuls are at least
    :data:`BF16_MIN_SPEEDUP` times faster than fp32 (measured once per process by a short probe,
    :func:`cpu_bf16_is_fast`); float32 everywhere else.  Other names as :func:`parse_dtype`.

    Raises:
        ValueError: unknown name.
    """
    dtype = parse_dtype(name)
    if dtype is not None:
        return dtype
    device_type = torch.device(device).type
    if device_type == "cuda":
        fast = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        fast = device_type == "cpu" and cpu_bf16_is_fast()
    return torch.bfloat16 if fast else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` or ``"fp32"``: the short name under which a resolved dtype is recorded."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def dtype_record(name: str, dtype: torch.dtype) -> dict:
    """What results and configs record of a dtype: the resolved name, and whether ``"auto"`` chose it.

    E.g. ``{"dtype": "bf16", "dtype_auto": True}`` for ``--dtype auto`` resolved to bfloat16.
    """
    return {"dtype": dtype_name(dtype), "dtype_auto": name == AUTO_DTYPE}


def cpu_bf16_speedup(size: int = 512, calls: int = 4, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of ``calls`` ``(size, size) x (size, size)`` ``F.linear`` on the CPU.

    Best of ``repeats`` timings of each, after one warm-up call (kernel selection); the bf16 time
    includes autocast's casts, as in real use.  Well under a second (0.06 s on this 2-core CPU).
    """
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    inputs, weight = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)

    def best_seconds(context) -> float:
        timings = []
        with torch.inference_mode(), context:
            F.linear(inputs, weight)
            for _ in range(repeats):
                began = time.perf_counter()
                for _ in range(calls):
                    F.linear(inputs, weight)
                timings.append(time.perf_counter() - began)
        return min(timings)

    fp32 = best_seconds(contextlib.nullcontext())
    bf16 = best_seconds(torch.autocast(device_type="cpu", dtype=torch.bfloat16))
    return fp32 / max(bf16, 1e-9)


CPU_BF16_ENV = "AMENDLM_CPU_BF16"  # "1" / "0": skip the probe (every process of a run then resolves auto alike)


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 autocast is at least :data:`BF16_MIN_SPEEDUP` times faster than fp32 on this CPU (cached per
    process).  The environment variable ``AMENDLM_CPU_BF16`` = ``1`` / ``0`` answers without the probe: a timing
    probe near the threshold can answer differently in two processes of one run (or two runs compared).

    Raises:
        ValueError: ``AMENDLM_CPU_BF16`` is set to anything but ``0`` or ``1`` (names the value)."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected \"0\" or \"1\" (or leave it unset to time bf16 here)")
        return forced == "1"
    speedup = cpu_bf16_speedup()
    logger.info("dtype auto: bf16 autocast matmuls are %.2fx fp32 on this CPU -> %s", speedup,
                "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    return speedup >= BF16_MIN_SPEEDUP


def autocast(dtype: torch.dtype, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``dtype`` is bfloat16, a no-op context for float32.

    Weights stay fp32; matmuls run in bf16 (about 2.4x faster on this CPU for training).

    Raises:
        ValueError: ``dtype`` is None (``parse_dtype("auto")``: resolve it with :func:`resolve_dtype`).
    """
    if dtype is None:
        raise ValueError("dtype 'auto' is not resolved: use resolve_dtype(name, device)")
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """Load the tokenizer of a model (embedded name, local dir, ``.gguf`` file or hub id).

    Raises:
        FileNotFoundError, OSError: as :func:`load_model`.
    """
    from transformers import AutoTokenizer

    path = resolve_model(model_name_or_path)
    with _hub_errors(model_name_or_path, path):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(
    model_name_or_path: str,
    adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` in fp32 safetensors weights, eval mode, optional PEFT adapter.

    The returned model carries ``amendlm_sources`` (``{"model", "model_path", "adapter"}``: what
    was asked for and the files it came from), from which :func:`amendlm.provenance.weights_record`
    hashes the weights an evaluation scored.

    Args:
        model_name_or_path: embedded name (``smollm2-135m-instruct``, ``gemma3-270m``), local
            directory, local ``.gguf`` file (converted once, :func:`amendlm.resources.resolve_model`)
            or hub id.
        adapter: a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``);
            loaded on top of the model and kept unmerged.
        device: where to put the model.
        trust_remote_code: passed to transformers; off by default.

    Raises:
        FileNotFoundError: the adapter directory has no ``adapter_config.json``; a local model
            path does not exist (names it).
        OSError: a hub id that is not in the local Hugging Face cache while the hub cannot be
            reached (says how to pass a local directory or GGUF file instead).
        ValueError: the adapter does not fit the model (names the adapter's recorded base and
            the model); an unsupported GGUF file.
    """
    from transformers import AutoModelForCausalLM

    if adapter is not None:
        check_adapter_dir(Path(adapter))
    path = resolve_model(model_name_or_path)
    with _hub_errors(model_name_or_path, path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = attach_adapter(model, adapter, model_name=model_name_or_path)
    model.to(device).eval()
    model.amendlm_sources = {"model": model_name_or_path, "model_path": path,
                             "adapter": str(adapter) if adapter is not None else None}
    return model, tokenizer


@contextlib.contextmanager
def _hub_errors(name: str, path: str) -> Iterator[None]:
    """Turn transformers' errors for a hub id it cannot fetch into one line saying what to do.

    Only for hub ids (``path == name`` and no such local path); other errors pass unchanged.
    """
    try:
        yield
    except OSError as err:
        if path != name or Path(name).expanduser().exists() or not _unreachable(err):
            raise
        from amendlm.resources import MODELS

        local = "" if Path(name).expanduser().is_absolute() else f", and no local directory '{name}' (relative to {Path.cwd()})"
        raise OSError(
            f"model '{name}' is not in the local Hugging Face cache and the hub could not be reached "
            f"(offline){local}; pass a local model directory (config.json + *.safetensors), a local .gguf file, "
            f"or an embedded model ({', '.join(sorted(MODELS))})"
        ) from err


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says a hub file is neither cached nor reachable."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    while err is not None:
        if isinstance(err, LocalEntryNotFoundError) or "couldn't connect to" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False



@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Run ``model`` in eval mode (every dropout off, LoRA dropout included) for the duration.

    Every scoring and evaluation entry point runs under it.  Afterwards, also on an exception,
    every submodule gets back its own train/eval flag (not just the top module's, so submodules
    the caller had put in eval mode stay there).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """Run the reference pass of a PEFT model (adapter off); re-enabled even on exceptions.

    For a model without adapters this is a no-op, so the caller must not rely on it to get a
    distinct reference model for full fine-tuning.
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        yield
        return
    with disable():
        yield


def start_token_id(tokenizer, start_token: str | int | None = None) -> int:
    """The token prepended to every scored text: BOS if the tokenizer has one, else EOS.

    Args:
        start_token: ``None`` (BOS, else EOS), ``"bos"``, ``"eos"``, a token string or an id.

    Raises:
        ValueError: the requested token does not exist in the tokenizer.
    """
    if isinstance(start_token, int):
        return start_token
    if start_token is None:
        token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    elif start_token in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{start_token}_token_id")
    else:
        token_id = tokenizer.convert_tokens_to_ids(start_token)
        if token_id == tokenizer.unk_token_id and start_token != tokenizer.unk_token:
            token_id = None
    if token_id is None:
        raise ValueError(f"tokenizer has no start token {start_token!r} (bos={tokenizer.bos_token}, eos={tokenizer.eos_token})")
    return int(token_id)


def pad_token_id(tokenizer, start_token: str | int | None = None) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else the start token.

    Padded positions are always masked, so the choice never changes a score.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return start_token_id(tokenizer, start_token)
