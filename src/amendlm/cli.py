"""The ``amendlm`` command line: one Typer app, each command a thin layer over the Python API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from amendlm.data.splits import DEFAULT_SEED
from amendlm.errors import OneLineUsageErrors, check_out_file, user_errors
from amendlm.resources import DEFAULT_MODEL

# defaults shown by --help; EvalConfig (amendlm.bias.evaluate) validates the values
_EVAL_BENCHMARKS = "stereoset,crows-pairs,perplexity"

app = typer.Typer(
    help="Change what a pretrained causal LM says after pre-training, and measure it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    cls=OneLineUsageErrors,  # usage errors: one plain line on stderr, not click's usage text in a rich panel
)


def package_version() -> str:
    """The installed amendlm's version (package metadata), else the source tree's ``amendlm.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amendlm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from amendlm import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"amendlm {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level, and show an input error (exit status 1: a missing file, model or adapter, ...) as its full traceback instead of one 'error:' line; usage errors (exit status 2) stay one line."),
    version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True, expose_value=False,
                                 help="Print amendlm's version and exit."),
) -> None:
    """amendlm: debias by unlearning (BiasUnlearn), align with a residual model (RAM), measure it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@app.command("eval")
def eval_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded model name, local directory, local .gguf file or Hugging Face id."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter directory applied on top of --model (with --aligner: on the proposal)."),
    aligner: Optional[str] = typer.Option(None, help="Score --model x this aligner as one LM, softmax(b/T_b + a/T_e) (RAM's mds rule): an aligner directory, an 'align train' run directory holding aligner/, an embedded name or hub id."),
    proposal_temperature: float = typer.Option(1.0, help="T_b dividing the model's logits in the pair (needs --aligner)."),
    aligner_temperature: float = typer.Option(1.0, help="T_e dividing the aligner's logits in the pair (needs --aligner)."),
    benchmarks: str = typer.Option(_EVAL_BENCHMARKS, help=f"Comma-separated subset of: {_EVAL_BENCHMARKS}."),
    split: str = typer.Option("all", help="StereoSet target-term split: train, val, test or all."),
    split_seed: int = typer.Option(DEFAULT_SEED, help="Seed of the target-term split."),
    limit: Optional[int] = typer.Option(None, help="Keep only the first N examples of each benchmark."),
    dtype: str = typer.Option("fp32", help="fp32 (exact), bf16 (autocast; fast only where the CPU/GPU has bf16 units) or auto (bf16 where the device does it natively fast, else fp32; the results record which)."),
    batch_size: int = typer.Option(32, help="Sequences per forward pass."),
    start_token: Optional[str] = typer.Option(None, help="Token prepended to each text: bos, eos or a token string (default: BOS, else EOS)."),
    stereoset: str = typer.Option("stereoset", help="StereoSet name or local jsonl/json/csv."),
    crows_pairs: str = typer.Option("crows-pairs", help="CrowS-Pairs name or local csv."),
    wikitext: str = typer.Option("wikitext-sample", help="Perplexity text: name or local jsonl with a 'text' field."),
    share_prefix: bool = typer.Option(True, help="Compute the shared prefix of StereoSet's three candidates once (needs 4-D attention-mask support)."),
    device: str = typer.Option("cpu", help="Device: cpu, or an accelerator present here (cuda, cuda:1, mps, ...)."),
    out: Optional[Path] = typer.Option(None, help="Write the results JSON here (atomically)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
) -> None:
    """Evaluate bias (StereoSet, CrowS-Pairs) and perplexity of a model, optionally with an adapter and/or an aligner."""
    from amendlm.bias.evaluate import EvalConfig, evaluate_model
    from amendlm.product import AlignerConfig
    from amendlm.report import atomic_write_json, print_eval_report

    try:
        config = EvalConfig(
            benchmarks=_split_list(benchmarks), split=split, split_seed=split_seed, limit=limit, dtype=dtype,
            batch_size=batch_size, start_token=start_token, stereoset=stereoset, crows_pairs=crows_pairs,
            wikitext=wikitext, share_prefix=share_prefix,
        )
        if aligner is None and (proposal_temperature != 1.0 or aligner_temperature != 1.0):
            raise ValueError("--proposal-temperature and --aligner-temperature apply to a pair: give --aligner")
        pair = None if aligner is None else AlignerConfig(aligner, proposal_temperature, aligner_temperature)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    from amendlm.distributed import check_device

    with user_errors():  # a bad --device or --adapter, an --out that cannot be written: one line, before any model loads
        check_device(device, index=True)
        check_out_file(out, example="eval.json")
        if adapter is not None:
            from amendlm.adapters import check_adapter_dir

            check_adapter_dir(adapter, "--adapter")
    if pair is not None:
        from amendlm.product import check_aligner

        with user_errors():  # a wrong --aligner: one line naming it, before the warning below and any model load
            check_aligner(pair)
    if (adapter is not None or aligner is not None) and split == "all" and "stereoset" in config.benchmarks:
        typer.secho("warning: --split all includes the StereoSet target terms adapters and aligners are trained on "
                    "(train) and selected on (val); report held-out numbers with --split test", fg=typer.colors.YELLOW, err=True)
    with user_errors():
        results = evaluate_model(model, config, adapter=adapter, device=device, trust_remote_code=trust_remote_code,
                                 aligner=pair)
    print_eval_report(results)
    if out is not None:
        atomic_write_json(out, results)
        typer.echo(f"wrote {out}")


def main() -> None:
    """Console-script entry point."""
    app()


# Commands of the other subsystems register themselves here (each module adds its commands
# to ``app``): amendlm.unlearn.commands (debias, merge), amendlm.ram.commands (align ...) and
# amendlm.bias.compare_command (compare), amendlm.serve.commands (serve).
from amendlm.unlearn.commands import register as _register_unlearn
_register_unlearn(app)
from amendlm.ram.commands import register as _register_ram
_register_ram(app)
from amendlm.bias.compare_command import register as _register_compare
_register_compare(app)
from amendlm.finetune import register as _register_finetune
_register_finetune(app)
from amendlm.serve.commands import register as _register_serve
_register_serve(app)
