"""Attaching PEFT (LoRA) adapters to a loaded model, with one-line errors for an adapter that does not fit.

:func:`amendlm.modeling.load_model` attaches an ``adapter`` through :func:`attach_adapter`; both names
are also importable from :mod:`amendlm.modeling`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)


def attach_adapter(model, adapter: str | Path, model_name: str | None = None):
    """Wrap ``model`` in a :class:`peft.PeftModel` loaded from ``adapter`` and check it took effect.

    An adapter whose modules do not all exist in the model, whose tensor shapes differ from the
    model's (another base model), or that the model has more LoRA slots for than it provides,
    would otherwise fail with a long peft error or be partly or silently ignored (the
    "debiased" model would be the base model).  All-zero ``lora_B`` (``debias`` kept step 0): the
    base model, loaded with a warning.  Another recorded base is allowed if every tensor fits.

    Args:
        model: a transformers causal LM; peft injects the LoRA layers into it.
        adapter: the adapter directory.
        model_name: how the model was asked for (for messages); default ``model.name_or_path``.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` in ``adapter``.
        ValueError: unreadable ``adapter_config.json``; the adapter does not fit the model (one
            line naming the adapter's recorded base, the model and the first mismatch: a shape,
            a missing module, or the adapter's tensors and the LoRA parameters created in the
            model that differ).
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    check_adapter_dir(adapter)
    try:
        base_recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from None
    model_name = model_name or getattr(model, "name_or_path", None)
    base = f"base model '{base_recorded}'" if base_recorded else "an unrecorded base model"
    misfit = (f"{adapter}: adapter made for {base} does not fit "
              + (f"model '{model_name}'" if model_name else "this model"))
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError) as err:
        if not _is_misfit(err):
            raise
        raise ValueError(f"{misfit} ({_first_mismatch(err)})") from err
    weights_file = adapter / "adapter_model.safetensors"
    if weights_file.is_file():
        with safe_open(str(weights_file), framework="pt") as handle:
            saved = set(handle.keys())
        created = set(get_peft_model_state_dict(peft_model))
        if saved != created:
            missing, unused = sorted(created - saved)[:3], sorted(saved - created)[:3]
            raise ValueError(
                f"{misfit}: model LoRA tensors absent from the adapter: {missing}; "
                f"adapter tensors with no place in the model: {unused}"
            )
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    if lora_b and all(not bool(p.detach().any()) for p in lora_b):
        try:  # amendlm debias saves the untouched base when no evaluation beat step 0 (summary.json)
            kept_0 = json.loads((adapter / "summary.json").read_text()).get("best_step") == 0
        except (OSError, ValueError, AttributeError):
            kept_0 = False
        logger.warning("%s: %severy lora_B is zero: a valid adapter equal to the base model, used as is", adapter,
                       "the run kept step 0 (no evaluation beat it), so " if kept_0 else "")
    logger.info("loaded adapter %s (trained on base %s)", adapter, base_recorded)
    return peft_model


def _is_misfit(err: Exception) -> bool:
    """Whether a ``PeftModel.from_pretrained`` error says the adapter does not fit the model.

    Only peft's (torch's) ``RuntimeError`` listing a ``size mismatch for ...`` and peft's
    ``ValueError`` "Target modules [...] not found in the base model" (peft 0.21:
    ``NoMatchingPeftModuleError``); anything else (out of memory, a bug) is not one.
    """
    if isinstance(err, RuntimeError):
        return "size mismatch for" in str(err)
    return isinstance(err, ValueError) and "not found in the base model" in str(err)


def _first_mismatch(err: Exception) -> str:
    """The first informative line of a peft/torch loading error, e.g. one ``size mismatch for ...``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("size mismatch for"):
            line = re.sub(r"torch\.Size\((\[[^\]]*\])\)", r"\1", line)
            return (line.replace("copying a param with shape", "adapter")
                    .replace("from checkpoint, the shape in current model is", "vs model").rstrip("."))
    return lines[0] if lines else type(err).__name__


def check_adapter_dir(adapter: Path, option: str | None = None) -> None:
    """Raise ``FileNotFoundError`` saying whether ``adapter`` is missing or holds no ``adapter_config.json``
    (before any model loads); ``option`` (``--adapter``): the command-line option named first."""
    said = f"{option} {adapter}" if option else str(adapter)
    if not adapter.exists():
        raise FileNotFoundError(f"{said}: no such adapter directory")
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{said}: not a PEFT adapter directory (no adapter_config.json)")
