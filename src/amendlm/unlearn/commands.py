"""``amendlm debias`` and ``amendlm merge``: thin commands over :mod:`amendlm.unlearn`.

Registered on the main app by :func:`register` (called at the end of ``amendlm.cli``); torch,
transformers and peft are imported inside the command bodies so ``amendlm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from amendlm.resources import DEFAULT_MODEL

METHOD_NAMES = "biasunlearn, npo, gradascent, graddiff, dpo, sft-anti"


def debias(
    out: Path = typer.Option(..., help="Output directory: adapter, unlearn_config.json, log.jsonl, ss_per_type.png, checkpoint/."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, local directory or Hugging Face id."),
    method: str = typer.Option("biasunlearn", help=f"One of: {METHOD_NAMES}."),
    max_steps: int = typer.Option(200, help="Optimizer steps at most (BiasUnlearn may stop earlier by its stop rule)."),
    batch_size: int = typer.Option(8, help="Examples per stream (forget, retain, KL) per step."),
    lr: float = typer.Option(2e-4, help="Peak AdamW learning rate (linear decay)."),
    seed: int = typer.Option(0, help="Training seed (sampling order, LoRA init, dropout)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint (same configuration; --max-steps may grow)."),
    finetune: str = typer.Option("lora", help="lora (PEFT adapter) or full."),
    reference: str = typer.Option("adapter", help="adapter (base = adapter disabled, one copy) or copy (second frozen model)."),
    adversarial_fraction: float = typer.Option(0.25, help="Share of anti-stereotypes per bias type also in the forget set."),
    npo_reduction: str = typer.Option("sequence", help="NPO log-ratio: sequence (per-sequence sums) or batch_mean (official code)."),
    val_clusters: int = typer.Option(300, help="Val clusters scored per evaluation (stratified; 0 = all)."),
    schedule_scale: float = typer.Option(0.25, help="Multiplies the swap schedule's step counts (official = 1)."),
    eval_every: int = typer.Option(50, help="Evaluation period of methods without dynamic swapping."),
    checkpoint_every: int = typer.Option(25, help="Steps between checkpoints."),
    kl_texts: str = typer.Option("xsum-sample", help="General text added to the KL set ('none' for unrelated sentences only)."),
    keep_best: bool = typer.Option(True, help="Keep the weights of the evaluation with the smallest worst val gap."),
    dtype: str = typer.Option("auto", help="fp32, bf16 autocast (fast only with bf16 hardware) or auto (bf16 where the device does it natively fast, else fp32; unlearn_config.json records which)."),
    cpu: bool = typer.Option(False, help="Use the CPU even if an accelerator is present."),
    config: Optional[Path] = typer.Option(None, help="Run the configuration saved in this unlearn_config.json (every other option except --out is ignored)."),
) -> None:
    """Debias a causal LM by unlearning (BiasUnlearn, arXiv:2509.25673) or a baseline method."""
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.trainer import train

    try:
        if config is not None:
            run_config = UnlearnConfig.from_dict({**UnlearnConfig.load(config).to_dict(), "out": str(out)})
        else:
            run_config = UnlearnConfig(
                out=str(out), model=model, method=method, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                finetune=finetune, reference=reference, adversarial_fraction=adversarial_fraction,
                npo_reduction=npo_reduction, val_clusters=val_clusters or None, schedule_scale=schedule_scale,
                eval_every=eval_every, checkpoint_every=checkpoint_every,
                kl_texts=None if kl_texts.lower() == "none" else kl_texts, keep_best=keep_best, dtype=dtype, cpu=cpu,
            )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    from amendlm.errors import user_errors
    from amendlm.unlearn.resume import check_resume_config, check_run_directory

    with user_errors():  # an existing run without --resume, --resume with another configuration: one line, exit 1
        check_run_directory(out, resume)
        check_resume_config(run_config, resume)
    result = train(run_config, resume=resume)
    _print_summary(out)
    kept = f"the weights of step {result.best_step} (best val worst gap)" if run_config.keep_best and result.best_step is not None else "the last step's weights"
    typer.echo(f"{result.status} after {result.steps} steps; {kept} saved in {out}")
    if run_config.keep_best and result.best_step == 0 and result.status != "interrupted":
        typer.echo("warning: no evaluation beat step 0 on val, so the saved weights are the untouched base "
                   "(rerun with --no-keep-best to keep the last step's weights)", err=True)
    if result.status == "nan":
        raise typer.Exit(1)
    if result.status == "interrupted":
        raise typer.Exit(130)


def _print_summary(out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from amendlm.unlearn.artifacts import read_log

    evals = [r for r in read_log(out / "log.jsonl") if r.get("event") == "eval"]
    if not evals:
        return
    first, last = evals[0], evals[-1]
    table = Table(title=f"val SS per bias type (ideal 50): step {first['step']} -> step {last['step']}")
    for column in ("bias type", "SS before", "SS after", "LMS before", "LMS after"):
        table.add_column(column, justify="left" if column == "bias type" else "right")
    for name in first["ss"]:
        table.add_row(name, f"{first['ss'][name]:.2f}", f"{last['ss'].get(name, float('nan')):.2f}",
                      f"{first['lms'][name]:.2f}", f"{last['lms'].get(name, float('nan')):.2f}")
    Console().print(table)


def merge(
    adapter: Path = typer.Option(..., help="PEFT adapter directory (e.g. the --out of amendlm debias)."),
    out: Path = typer.Option(..., help="Where to write the merged model (must not exist or be empty)."),
    model: str = typer.Option(DEFAULT_MODEL, help="The base model the adapter was trained on."),
    device: str = typer.Option("cpu", help="Device used for merging."),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain safetensors model."""
    from amendlm.unlearn.artifacts import merge_adapter

    try:
        path = merge_adapter(model, adapter, out, device=device)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    typer.echo(f"merged model written to {path}")


def register(app: typer.Typer) -> None:
    """Add ``debias`` and ``merge`` to the ``amendlm`` app."""
    app.command("debias")(debias)
    app.command("merge")(merge)
