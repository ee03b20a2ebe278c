"""Files of an unlearning run: atomic checkpoints, the JSONL log and the SS plot.

Layout of ``out/``::

    unlearn_config.json        the UnlearnConfig (written first)
    log.jsonl                  one record per step ({"step", "loss", parts, "lr", "grad_norm", "focus",
                               "swap", "seconds"}: ``seconds`` = that one step's wall-clock seconds, not
                               the run's so far as in ``align train``'s train_log.jsonl) and per
                               evaluation ({"event": "eval", "ss": {type: SS}, ...})
    ss_per_type.png            val SS per bias type over steps
    checkpoint/                trainable.safetensors, optimizer.pt, rng.pt, state.json
    best/                      trainable weights of the best evaluation (keep_best)
    adapter_config.json + adapter_model.safetensors   the resulting PEFT adapter (LoRA)
    summary.json               status, steps, best step, last val scores, timings, versions

A checkpoint directory is written beside its final name and renamed into place; the previous
one is kept as ``checkpoint.old`` until the rename succeeded, so a crash at any point leaves one
complete checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from amendlm.report import atomic_directory, atomic_save_figure, atomic_write_text


def tied_duplicates(state: dict[str, torch.Tensor]) -> set[str]:
    """Names in ``state`` whose tensor shares memory with an earlier name's (tied weights).

    E.g. ``lm_head.weight`` of a model that ties it to ``model.embed_tokens.weight`` (SmolLM2,
    Gemma 3): safetensors refuses to save two names for one storage, and loading the first name
    in place also sets the other.
    """
    seen, duplicates = set(), set()
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            duplicates.add(name)
        seen.add(key)
    return duplicates


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors a run changes: LoRA weights of a PEFT model, else the full state dict less
    tied duplicates (:func:`tied_duplicates`; one name per shared storage)."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
        tied = tied_duplicates(state)
        state = {name: tensor for name, tensor in state.items() if name not in tied}
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`trainable_state`.

    Raises:
        ValueError: tensors missing from or unknown to the model.
    """
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"checkpoint tensors unknown to the model: {unexpected[:5]}")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in tied_duplicates(model.state_dict())]  # set in place
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def rng_state() -> dict:
    """This process's random states: ``{"torch", "python"}`` and ``"cuda"`` where there is CUDA."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(directory: Path, model, optimizer, state: dict, rng_states: list[dict] | None = None) -> None:
    """Write weights, optimizer, RNG states and the trainer state, atomically (see module doc).

    ``rng_states``: :func:`rng_state` of every process (index = process index), default this
    process's only; ``rng.pt`` holds the first at its top level and all of them under ``processes``.
    """
    rng_states = rng_states or [rng_state()]
    with atomic_directory(directory) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save({**rng_states[0], "processes": rng_states}, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def find_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint at ``directory`` (or its ``.old`` twin after a crash), else None."""
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, model, optimizer, process_index: int = 0) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state dict.

    The RNG state is process ``process_index``'s where the checkpoint has it, else the first
    process's (a checkpoint written by fewer processes, or after an interrupt).

    Raises:
        FileNotFoundError: no complete checkpoint.
    """
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {directory}; run without --resume to start afresh")
    load_trainable_state(model, load_file(str(found / "trainable.safetensors")))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(found / "optimizer.pt", weights_only=False))
    rng = torch.load(found / "rng.pt", weights_only=False)
    processes = rng.get("processes") or [rng]
    set_rng_state(processes[process_index] if process_index < len(processes) else processes[0])
    return json.loads((found / "state.json").read_text())


def save_weights(directory: Path, model) -> None:
    """Atomically write only the trainable weights (the ``best/`` snapshot)."""
    with atomic_directory(directory) as staging:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))


def load_weights(directory: Path, model) -> None:
    """Load a :func:`save_weights` snapshot into ``model``."""
    load_trainable_state(model, load_file(str(directory / "trainable.safetensors")))


class StepLog:
    """Append-only JSONL log; on resume, records after the checkpoint's step are dropped.

    ``on_record``, if given, is called with every record after it is written (e.g. a progress bar).
    ``enabled=False`` (the other processes of a multi-process run): touches no file, ignores records.
    """

    def __init__(self, path: Path, resume_step: int | None = None, on_record: Callable[[dict], None] | None = None,
                 enabled: bool = True):
        self.path, self.on_record, self.enabled = path, on_record, enabled
        if not enabled:
            return
        records = read_log(path) if resume_step is not None else []
        kept = [r for r in records if r.get("step", 0) <= resume_step] if resume_step is not None else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        """Append one record and flush it to disk (nothing when disabled)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.on_record is not None:
            self.on_record(record)


def read_log(path: Path) -> list[dict]:
    """All records of a JSONL log (a torn last line from a crash is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_ss(records: list[dict], path: Path, tolerance: float = 2.0, title: str = "") -> bool:
    """PNG of val SS per bias type over steps, from the log's eval records; False if none.

    The band ``50 +/- tolerance`` is the stop region; written atomically.
    """
    evals = [r for r in records if r.get("event") == "eval"]
    if not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for r in evals for name in r["ss"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhspan(50 - tolerance, 50 + tolerance, color="0.9", label=f"50 ± {tolerance:g}")
    ax.axhline(50, color="0.5", lw=0.8)
    for name in names:
        points = [(r["step"], r["ss"][name]) for r in evals if name in r["ss"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                lw=2.2 if name == "overall" else 1.2, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("StereoSet SS on val targets (ideal 50)")
    ax.set_title(title or "SS per bias type during unlearning")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return True


def merge_adapter(model_name_or_path: str, adapter: str | Path, out: str | Path, device: str = "cpu") -> Path:
    """Fold a LoRA adapter into its base model and save the result as a plain safetensors model.

    The merged directory loads with ``from_pretrained`` (and ``amendlm eval --model OUT``) without
    PEFT.  Written to a sibling temporary directory and renamed into place.

    Raises:
        FileExistsError: ``out`` exists and is not an empty directory.
        FileNotFoundError / ValueError: see :func:`amendlm.adapters.attach_adapter`.
    """
    from amendlm.modeling import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new --out")
    model, tokenizer = load_model(model_name_or_path, adapter=adapter, device=device)
    merged = model.merge_and_unload()
    with atomic_directory(out) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / "merged_from.json").write_text(json.dumps(
            {"base": model_name_or_path, "adapter": str(adapter)}, indent=2) + "\n")
    return out
