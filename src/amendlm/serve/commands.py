"""``amendlm serve``: a thin Typer command over :func:`amendlm.serve.server.serve`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from amendlm.errors import user_errors
from amendlm.resources import DEFAULT_MODEL


def serve_command(
    model: str = typer.Option(DEFAULT_MODEL, help="Proposal model: embedded name, local directory, local .gguf file or Hugging Face id (served alone)."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter on --model (e.g. a debias run), applied unmerged."),
    aligner: List[str] = typer.Option([], help="NAME=DIR: an aligner served as MODEL+NAME with the one proposal (repeatable); DIR an aligner directory, an 'align train' run directory, a .gguf file, an embedded name or a hub id; alone, an embedded name is served under itself and an existing directory or .gguf file under its last path part."),
    name: Optional[str] = typer.Option(None, help="Id of the model alone in /v1/models (default: --model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port (0 = any free port, printed at start)."),
    mode: str = typer.Option("par-kl", help="Default RAM mode of the pairs: par, par-kl, sir, sir-best, mds, proposal, aligner."),
    candidates: int = typer.Option(8, help="SIR: proposal draws per token."),
    kl_threshold: float = typer.Option(0.1, help="PAR-KL: use the proposal above this KL (nats)."),
    proposal_top_p: float = typer.Option(0.95), aligner_top_p: float = typer.Option(0.9),
    max_batch_size: int = typer.Option(8, help="Requests decoded together at most (1 = no batching)."),
    max_wait_ms: float = typer.Option(10.0, help="How long the oldest waiting request waits for others to batch with."),
    max_queue: int = typer.Option(256, help="Waiting prompts at most; beyond, 503 with Retry-After."),
    default_max_tokens: int = typer.Option(128, help="Completion length when a request sets no max_tokens."),
    shutdown_timeout: float = typer.Option(30.0, help="Seconds in-flight requests get to finish after SIGTERM."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 autocast or auto."),
    device: str = typer.Option("cpu", help="cpu, or an accelerator present here (cuda, cuda:1, mps, ...)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the hub (off by default)."),
) -> None:
    """Serve the model (and MODEL+NAME pairs with aligners) over an OpenAI-compatible HTTP API."""
    from amendlm.ram.decoding import DecodeConfig
    from amendlm.serve.models import parse_aligner_option
    from amendlm.serve.server import ServeConfig, serve

    try:
        aligners = dict(parse_aligner_option(value) for value in aligner)
        decode = DecodeConfig(mode=mode, candidates=candidates, kl_threshold=kl_threshold, proposal_top_p=proposal_top_p,
                              aligner_top_p=aligner_top_p)
        config = ServeConfig(model=model, adapter=str(adapter) if adapter else None, aligners=aligners, name=name, host=host,
                             port=port, decode=decode, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, default_max_tokens=default_max_tokens, shutdown_timeout=shutdown_timeout,
                             dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        # a KeyError's str() is its message quoted; a ValueError's is the message itself (its quotes kept)
        raise typer.BadParameter(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)) from None

    def ready(bound_host, bound_port):
        typer.echo(f"amendlm serve: listening on http://{bound_host}:{bound_port} (models: /v1/models)", err=True)

    from amendlm.distributed import check_device

    with user_errors():  # a bad device, model, adapter or aligner: one line, before any model loads
        check_device(device, index=True)
        _check_models(config)
        serve(config, on_ready=ready)


def _check_models(config) -> None:
    """Check ``--model``, ``--adapter`` and every ``--aligner`` without loading them; each aligner becomes
    the path to load (an ``align train`` run directory: its ``aligner/``).

    Raises:
        FileNotFoundError, ValueError: one line naming the option and the value.
    """
    from amendlm.adapters import check_adapter_dir
    from amendlm.ram.api import check_model_name, resolve_aligner

    check_model_name(config.model, "--model")
    if config.adapter is not None:
        check_adapter_dir(Path(config.adapter), "--adapter")
    config.aligners = {name: resolve_aligner(path, "--aligner") for name, path in config.aligners.items()}


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the main app."""
    app.command("serve")(serve_command)
