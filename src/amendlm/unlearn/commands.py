"""``amendlm debias`` and ``amendlm merge``: thin commands over :mod:`amendlm.unlearn`.

Registered on the main app by :func:`register` (called at the end of ``amendlm.cli``); torch,
transformers and peft are imported inside the command bodies so ``amendlm --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from amendlm.errors import optional_name
from amendlm.resources import DEFAULT_MODEL
from amendlm.unlearn.flags import error_line, option_flags, recipe_default
from amendlm.unlearn.schedule import DEFAULT_TOLERANCE

TOLERANCE = f"{DEFAULT_TOLERANCE:g}"  # the stop rule's default tolerance (UnlearnConfig's), as --help states it

METHOD_NAMES = "biasunlearn, npo, gradascent, graddiff, dpo, sft-anti, dpo-swap"  # = METHODS (a test checks; no torch import here)


def debias(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Output directory: adapter, unlearn_config.json, log.jsonl, summary.json, ss_per_type.png, best/, checkpoint/."),
    recipe: Optional[str] = typer.Option(None, show_default="pairwise, or biasunlearn with --method", help="Preset of the options below: pairwise (DPO pairs under BiasUnlearn's val-driven control, chosen on val: see the README), biasunlearn (the option defaults shown below where no pairwise value is shown beside them: the paper's NPO/CE/KL losses with amendlm's settings; 'default' is its former name, still accepted) or official (the public BiasUnlearn code's settings and control flow). Without --recipe: pairwise, unless --method names another method (then biasunlearn). Options given explicitly override it; unlearn_config.json records both."),
    config: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="Start from a saved unlearn_config.json, or from a JSON object of some of its fields (applied over the recipe it names; without one, as --recipe's default); options given explicitly override it (recorded in recipe_overrides)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, local directory, local .gguf file or Hugging Face id."),
    method: str = typer.Option("biasunlearn", show_default=recipe_default("method", "biasunlearn"), help=f"One of: {METHOD_NAMES}."),
    max_steps: int = typer.Option(200, show_default=recipe_default("max_steps", 200), help="Optimizer steps at most (BiasUnlearn may stop earlier by its stop rule)."),
    batch_size: int = typer.Option(8, help="Examples per stream (forget, retain, KL) per step, unless a per-stream size is given; under accelerate launch, of all processes together."),
    forget_batch_size: Optional[int] = typer.Option(None, show_default="--batch-size", help="Forget (and DPO pair) examples per step."),
    retain_batch_size: Optional[int] = typer.Option(None, show_default="--batch-size", help="Retain examples per step."),
    kl_batch_size: Optional[int] = typer.Option(None, show_default="--batch-size", help="KL examples per step."),
    lr: float = typer.Option(2e-4, show_default=recipe_default("lr", 2e-4), help="Peak AdamW learning rate (linear decay)."),
    warmup_steps: int = typer.Option(0, show_default=recipe_default("warmup_steps", 0), help="Linear warm-up steps at the start of the run."),
    alpha_forget: float = typer.Option(0.5, show_default=recipe_default("alpha_forget", 0.5), help="Weight of the forget loss (NPO; DPO for dpo-swap)."),
    alpha_retain: float = typer.Option(0.3, show_default=recipe_default("alpha_retain", 0.3), help="Weight of the retain loss (CE on anti-stereotypes; on the chosen side for dpo-swap)."),
    alpha_kl: float = typer.Option(0.2, help="Weight of the KL loss on neutral text."),
    npo_beta: float = typer.Option(0.1, help="NPO inverse temperature."),
    dpo_beta: float = typer.Option(0.1, help="DPO inverse temperature (dpo, dpo-swap)."),
    npo_reduction: str = typer.Option("sequence", help="NPO log-ratio: sequence (per-sequence sums), token_mean (per-sequence token means), batch_mean (one token-weighted ratio per batch) or batch_sequence_mean (one per batch, mean of the sequences' token means: official code)."),
    ce_reduction: str = typer.Option("token", help="Retain CE mean: token (over the batch's tokens) or sequence (of each sequence's token mean: official code)."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0 = no clipping, as the official code)."),
    loss_tokens: str = typer.Option("all", help="all continuation tokens, or only those differing from the other side of the cluster (differing)."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha (scale alpha / r)."),
    lora_scope: str = typer.Option("all", help="LoRA on all projections (all) or the attention projections only (attention)."),
    target_modules: Optional[str] = typer.Option(None, help="Comma list of LoRA target module names or path suffixes (overrides --lora-scope), e.g. q_proj,v_proj."),
    seed: int = typer.Option(0, help="Training seed (sampling order, LoRA init, dropout)."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint (same configuration; --max-steps may grow)."),
    finetune: str = typer.Option("lora", help="lora (PEFT adapter) or full."),
    reference: str = typer.Option("adapter", help="adapter (base = adapter disabled, one copy) or copy (second frozen model)."),
    adversarial_fraction: float = typer.Option(0.25, help="Share of anti-stereotypes per bias type also in the forget set."),
    val_clusters: int = typer.Option(300, show_default=recipe_default("val_clusters", 300), help="Val clusters scored per evaluation (stratified; 0 = all)."),
    schedule_scale: float = typer.Option(0.25, show_default=recipe_default("schedule_scale", 0.25), help="Multiplies the swap schedule's step counts (official = 1)."),
    eval_every: int = typer.Option(50, help="Evaluation period of methods without dynamic swapping."),
    type_focus: str = typer.Option("worst", show_default=recipe_default("type_focus", "worst"), help=f"What a swap decision trains on: worst (the bias type with the largest val gap, BiasUnlearn) or all (every type whose val SS is outside 50 ± {TOLERANCE}, the stop rule's tolerance, each swapped whose val SS < 50); methods without swapping (npo, dpo, ...) ignore it."),
    initial_all_types_steps: int = typer.Option(0, help="Train every bias type together until this step before the first swap decision (official 100)."),
    rest_within: Optional[float] = typer.Option(None, show_default=recipe_default("rest_within", None), help=f"With --type-focus all: a bias type whose val gap is below this rests for the phase while a farther type trains; at least the stop rule's tolerance, {TOLERANCE}."),
    initial_eval_every: int = typer.Option(0, help="Evaluations (recorded, no decision) every this many steps during --initial-all-types-steps (0: none)."),
    checkpoint_every: int = typer.Option(25, help="Steps between checkpoints."),
    kl_texts: str = typer.Option("xsum-sample", help="General text added to the KL set: an embedded dataset or a jsonl/json/csv file whose rows hold the text in the --kl-text-field field ('none' or '' for unrelated sentences only)."),
    kl_text_field: str = typer.Option("document", help="The field of the --kl-texts rows that holds the text (xsum-sample: document; a WikiText-like file: text)."),
    kl_unrelated: bool = typer.Option(True, help="StereoSet's unrelated sentences in the KL set (--no-kl-unrelated: only the general text of --kl-texts)."),
    keep_best: bool = typer.Option(True, help="Keep the weights of the evaluation chosen by --selection (else the last step's)."),
    selection: str = typer.Option("gap", show_default=recipe_default("selection", "gap"), help="gap (smallest worst val SS gap) or gap_within_lms (the same among evaluations whose val LMS fell at most --max-lms-drop from step 0)."),
    max_lms_drop: float = typer.Option(2.0, help="LMS points an evaluation may lose and still be kept by --selection gap_within_lms."),
    dtype: str = typer.Option("auto", help="fp32, bf16 autocast (fast only with bf16 hardware) or auto (bf16 where the device does it natively fast, else fp32; unlearn_config.json records which)."),
    device: str = typer.Option("auto", help="auto (an accelerator when Accelerate finds one, else the CPU), cpu, or an accelerator type such as cuda (no index: choose the card with CUDA_VISIBLE_DEVICES or accelerate launch)."),
    cpu: bool = typer.Option(False, help="The same as --device cpu."),
    packing: bool = typer.Option(False, help="Faster steps: pack each step's sequences into long rows with block attention masks and compute the reference log-probs of NPO / DPO once per example (the same losses up to float rounding; recorded in unlearn_config.json). Falls back to padded batches, saying why, where the attention kernel takes no custom mask."),
    progress: bool = typer.Option(True, help="Show a progress bar (step, losses, lr, time left) and one line per evaluation."),
) -> None:
    """Debias a causal LM by unlearning: the pairwise recipe (default), BiasUnlearn (arXiv:2509.25673) or a baseline method.

    Without --recipe and --method, the pairwise recipe's values replace the field defaults (method dpo-swap, 100 steps, lr 5e-4 with 5 warm-up steps, loss weights 1.0 / 0.1 / 0.2, type focus all with types within 4 of 50 resting, all val clusters, LMS-aware selection); the defaults below show them as "pairwise recipe: V".  With another --method (and no --recipe) a run takes the field defaults, --recipe biasunlearn's (the paper's losses with amendlm's settings): "with another --method: D".  Options given explicitly win over either.
    """
    from amendlm.unlearn.trainer import train

    try:
        run_config = debias_config(out, explicit_options(ctx), recipe, config, flags=option_flags(ctx.command, _NOT_CONFIG))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    from amendlm.errors import check_out_directory, user_errors
    from amendlm.unlearn.resume import check_resume_config, check_run_directory

    from amendlm.distributed import check_device

    with user_errors():  # an existing run without --resume, --resume with another configuration: one line, exit 1
        check_device(run_config.device)
        check_out_directory(out)
        check_run_directory(out, resume)
        check_resume_config(run_config, resume)
        _check_model_and_texts(run_config)  # before the progress bar and any model load
    from amendlm.distributed import is_main_launched_process

    main = is_main_launched_process()  # under accelerate launch only the main process shows and prints
    with user_errors():  # a missing model, data file or adapter: one line, exit 1
        if progress and main:
            from amendlm.unlearn.progress import RunProgress

            with RunProgress(run_config.max_steps, _checkpoint_step(out) if resume else 0) as bar:
                result = train(run_config, resume=resume, on_record=bar)
        else:
            result = train(run_config, resume=resume)
    if not main:
        raise typer.Exit({"nan": 1, "interrupted": 130}.get(result.status, 0))
    _print_summary(out)
    kept = f"the weights of step {result.best_step} ({run_config.selection} selection on val)" if run_config.keep_best and result.best_step is not None else "the last step's weights"
    typer.echo(f"{result.status} after {result.steps} steps; {kept} saved in {out}")
    if run_config.keep_best and result.best_step == 0 and result.status != "interrupted":
        typer.echo("warning: no evaluation beat step 0 on val, so the saved weights are the untouched base "
                   "(rerun with --no-keep-best to keep the last step's weights)", err=True)
    if result.status == "nan":
        raise typer.Exit(1)
    if result.status == "interrupted":
        raise typer.Exit(130)


_NOT_CONFIG = ("out", "resume", "config", "recipe", "progress")  # command options that are not UnlearnConfig fields
_CLI_DEFAULTS = {"dtype": "auto"}  # where the command's default differs from UnlearnConfig's


def _check_model_and_texts(config) -> None:
    """A missing ``--model``, a missing ``--kl-texts`` (file or embedded name) or one whose rows lack the
    ``--kl-text-field``: FileNotFoundError or DataError, one line starting ``--model M`` / ``--kl-texts
    PATH`` (``--kl-texts X: ...`` for a name or path that is not there; ``--kl-texts FILE row N: ...``)."""
    from amendlm.data.io import DataError
    from amendlm.data.text import load_texts
    from amendlm.ram.api import check_model_name
    from amendlm.resources import resolve_dataset

    check_model_name(config.model)
    if config.kl_texts:
        path = resolve_dataset(config.kl_texts, option="--kl-texts")
        try:
            load_texts(path, field=config.kl_text_field, field_option="--kl-text-field")
        except DataError as err:  # its message starts with the file's path
            raise DataError(f"--kl-texts {err}") from None


def _checkpoint_step(out: Path) -> int:
    import json

    from amendlm.unlearn.artifacts import find_checkpoint

    found = find_checkpoint(out / "checkpoint")
    return json.loads((found / "state.json").read_text()).get("step", 0) if found is not None else 0


def _given(ctx: typer.Context, name: str) -> bool:
    # by the enum's name: typer may bundle its own click, whose ParameterSource is another class
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def explicit_options(ctx: typer.Context) -> dict:
    """The UnlearnConfig fields given explicitly on the command line (or by environment), converted:
    ``--val-clusters 0`` and ``--max-grad-norm 0`` -> None, ``--kl-texts none`` (or ``''``) -> None, ``--target-modules a,b`` -> ``["a", "b"]``."""
    given = {name: value for name, value in ctx.params.items() if name not in _NOT_CONFIG and _given(ctx, name)}
    if "max_grad_norm" in given:
        given["max_grad_norm"] = given["max_grad_norm"] or None
    if "val_clusters" in given:
        given["val_clusters"] = given["val_clusters"] or None
    if "kl_texts" in given:
        given["kl_texts"] = optional_name(given["kl_texts"])
    if "target_modules" in given:
        given["target_modules"] = [m.strip() for m in (given["target_modules"] or "").split(",") if m.strip()] or None
    return given


def debias_config(out: Path, given: dict, recipe: str | None = None, config_file: Path | None = None,
                  flags: dict | None = None):
    """The :class:`~amendlm.unlearn.config.UnlearnConfig` of one ``debias`` call.

    Without ``config_file``: preset ``recipe`` (when None, :func:`~amendlm.unlearn.recipes.cli_recipe`:
    ``pairwise``, or ``biasunlearn`` when ``given`` names another method) with ``given`` overriding it
    (:meth:`UnlearnConfig.from_recipe`).  With ``config_file``, either

    * a saved ``unlearn_config.json`` (it has ``out`` and every field a run has ever recorded):
      that configuration with ``given`` merged over it (the options win; ``recipe_overrides``
      adds them to the saved ones; fields it predates take :data:`FIELDS_ADDED`), or
    * a hand-written JSON object of some fields: those fields (but ``out``) and ``given`` over the
      recipe it names (``recipe``; without one, as :func:`~amendlm.unlearn.recipes.cli_recipe` picks
      from the method it or ``given`` names), all recorded as overrides.

    Args:
        out: output directory (replaces the saved ``out``).
        given: UnlearnConfig fields given explicitly (:func:`explicit_options`).
        flags: the command's flags by field (:func:`amendlm.unlearn.flags.option_flags`): an invalid
            value is then reported in flags (:func:`amendlm.unlearn.flags.error_line`); None (a Python
            caller): in fields.

    Raises:
        ValueError: ``recipe`` together with ``config_file`` (ambiguous: which wins?), unknown
            recipe, a config file that is not a JSON object, an unknown key or a value of the
            wrong type in it (checked before ``given`` is merged: the message names the file and
            the key), invalid values (an error that involves no given option: the message names
            the file; one that given options take part in: those options first).  With ``flags``
            None and no ``config_file``, the :class:`~amendlm.unlearn.field_errors.ConfigFieldError`
            itself (field names).
    """
    from amendlm.unlearn.config import FIELDS_ADDED, UnlearnConfig, check_fields, with_added_fields
    from amendlm.unlearn.recipes import cli_recipe

    def refused(err: ValueError, recipe_name=None, file_fields=(), options_involved=True) -> ValueError:
        if flags is None:  # a Python caller: fields named as fields, a file's error by the file
            return err if config_file is None else ValueError(f"{config_file}: {err}")
        return ValueError(error_line(err, flags, given if options_involved else {}, config_file, recipe_name,
                                     file_fields))

    if config_file is None:
        try:
            return UnlearnConfig.from_recipe(cli_recipe(recipe, given.get("method")), str(out), given, **_CLI_DEFAULTS)
        except ValueError as err:
            raise refused(err) from None
    if recipe is not None:
        raise ValueError("--recipe and --config together: give the recipe in the file (\"recipe\": ...) or drop "
                         "--config (options given explicitly are merged over either)")
    saved = _read_config_file(config_file)
    original = {f.name for f in dataclasses.fields(UnlearnConfig)} - set(FIELDS_ADDED)  # what every saved run has
    if not original <= set(saved):  # written by hand
        for where, data in (("", saved), ("recipe_overrides: ", saved.get("recipe_overrides", {}))):
            try:  # the file's own keys and types, before any option is merged: always the file's errors
                check_fields(data)
            except ValueError as err:
                raise ValueError(f"{config_file}: {where}{err}") from None
        in_file = saved.get("recipe_overrides", {})
        written = {k: v for k, v in saved.items() if k not in ("out", "recipe", "recipe_overrides", "dtype_auto")}
        overrides = {**in_file, **written, **given}
        try:
            name = cli_recipe(saved.get("recipe"), overrides.get("method"))
        except ValueError as err:  # the file's recipe: --recipe is refused with --config
            raise ValueError(f"{config_file}: {err}") from None
        try:
            return UnlearnConfig.from_recipe(name, str(out), overrides, **_CLI_DEFAULTS)
        except (TypeError, ValueError) as err:
            raise refused(err, name, {*in_file, *written}) from None
    try:
        saved = UnlearnConfig.from_dict(with_added_fields(saved)).to_dict()
    except (TypeError, ValueError) as err:  # the saved run alone is invalid
        raise refused(err, saved.get("recipe"), set(saved), options_involved=False) from None
    overrides = {**saved.get("recipe_overrides", {}), **given}
    try:
        return UnlearnConfig.from_dict({**saved, **given, "out": str(out), "recipe_overrides": overrides})
    except ValueError as err:
        raise refused(err, saved["recipe"], set(saved) - {"out", "recipe_overrides"}) from None


def _read_config_file(path: Path) -> dict:
    """The JSON object in ``path`` (a saved ``unlearn_config.json`` or a hand-written subset of its fields).

    Raises:
        ValueError: not JSON, or not an object (naming the file).
    """
    import json

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of UnlearnConfig fields, got {type(data).__name__}")
    return data


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
    device: str = typer.Option("cpu", help="Device used for merging: cpu, or an accelerator present here (cuda, cuda:1, ...)."),
) -> None:
    """Fold a LoRA adapter into its base model and save a plain safetensors model."""
    from amendlm.adapters import check_adapter_dir
    from amendlm.distributed import check_device
    from amendlm.errors import check_out_directory, user_errors
    from amendlm.unlearn.artifacts import merge_adapter

    try:  # usage errors (exit 2), before any model loads
        check_device(device, index=True)
        check_out_directory(out)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    with user_errors():  # input errors (a missing adapter or model, an --out that is not empty): exit 1, as eval's
        check_adapter_dir(adapter, "--adapter")  # before the model loads
        path = merge_adapter(model, adapter, out, device=device)
    typer.echo(f"merged model written to {path}")


def register(app: typer.Typer) -> None:
    """Add ``debias`` and ``merge`` to the ``amendlm`` app."""
    app.command("debias")(debias)
    app.command("merge")(merge)
