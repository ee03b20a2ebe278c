"""The work behind the ``amendlm align`` commands that is not option parsing.

Building the decoding config, running and printing a generation, ``--split val``'s settings, the
evaluation table and ``align train``'s closing line; :mod:`amendlm.ram.commands` holds the Typer commands
that call these.  torch and
transformers are imported inside the functions, as in the commands.
"""

from __future__ import annotations

import json

import typer


def decode_config(mode, candidates, kl_threshold, proposal_top_p, aligner_top_p, proposal_temperature,
                  aligner_temperature, eos_priority):
    """A :class:`amendlm.ram.decoding.DecodeConfig` from the commands' decoding options.

    Raises:
        ValueError, KeyError: as ``DecodeConfig`` (unknown mode, a value out of range).
    """
    from amendlm.ram.decoding import DecodeConfig

    return DecodeConfig(mode=mode, candidates=candidates, kl_threshold=kl_threshold, proposal_top_p=proposal_top_p,
                        aligner_top_p=aligner_top_p, proposal_temperature=proposal_temperature,
                        aligner_temperature=aligner_temperature, eos_priority=eos_priority)


def generate_and_print(texts, proposal, aligner, decode, config, chat_template, stream, out, device) -> None:
    """Load proposal (x aligner), decode ``texts`` and print them: token by token for one prompt with ``stream``,
    else ``[i] text`` per row (as rows end with ``stream``); timings on stderr; ``out``: also a jsonl, written atomically.

    Raises:
        FileNotFoundError, ValueError, OSError: as :meth:`amendlm.ram.api.ResidualAlignedLM.from_pretrained`.
    """
    from amendlm.ram.api import ResidualAlignedLM
    from amendlm.ram.data import encode_prompt
    from amendlm.ram.generate import GenerationStats
    from amendlm.report import atomic_write_text

    ram = ResidualAlignedLM.from_pretrained(proposal, aligner, decode, device=device)
    ids = [encode_prompt(ram.tokenizer, t, chat_template) for t in texts]
    live = stream and len(texts) == 1
    shown: list[int] = []

    def on_step(step, token_ids, finished):
        if live and not (finished.all() and token_ids[0].item() == ram.pad_token_id and step > 0):
            shown.append(int(token_ids[0]))
            typer.echo(ram.tokenizer.decode(shown[-1:], skip_special_tokens=True), nl=False)

    def on_batch(indices, generations):
        if stream and not live:
            for index, generation in zip(indices, generations):
                typer.echo(f"[{index}] {generation.text}")

    stats = GenerationStats()
    results = ram.generate_ids(ids, config=config, stats=stats, on_step=on_step if live else None, on_batch=on_batch)
    if live:
        typer.echo("")
    elif not stream:
        for index, generation in enumerate(results):
            typer.echo(f"[{index}] {generation.text}")
    typer.echo(f"# {stats.new_tokens} tokens in {stats.seconds:.1f} s; first token {stats.first_token_seconds:.2f} s", err=True)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps({"prompt": t, "text": g.text, "finish_reason": g.finish_reason},
                                                  ensure_ascii=False) + "\n" for t, g in zip(texts, results)))


def val_split(aligner, finetuned, fraction, seed):
    """``--split val``'s settings: those of the ``align train`` run ``--aligner`` (else ``--finetuned``) names,
    ``--val-fraction``/``--val-seed`` where given (checked against the run before any model loads), else
    align train's defaults (every train prompt taken as sampled).

    Raises:
        ValueError: a value given that differs from the run's (:func:`amendlm.ram.validation.run_val`)."""
    from amendlm.ram.validation import FRACTION, SEED, ValSplit, run_of, run_val

    run = run_of(aligner) or run_of(finetuned)
    if run is not None:
        return run_val(run, fraction, seed)
    return ValSplit(FRACTION if fraction is None else fraction, SEED if seed is None else seed)


def print_eval_table(results: dict, data: str) -> None:
    """Print ``align eval``'s results (:func:`amendlm.ram.evaluate.evaluate_systems`) as one rich table, a row per system."""
    from rich.console import Console
    from rich.table import Table

    stops = results["config"]["generate"]["stop"]
    table = Table(title=f"RAM on {data} ({results['config']['split']}, {results['n_prompts']} prompts; stop strings {stops!r})")
    for column in ("system", "ROUGE-1", "ROUGE-2", "ROUGE-L", "words", "ended by EOS", "par-kl fallback",
                   "= aligner argmax", "tok/s"):
        table.add_column(column, justify="left" if column == "system" else "right")

    def share(value):
        return "-" if value is None else f"{100 * value:.1f} %"

    for system, m in results["systems"].items():
        table.add_row(system, f"{m['rouge1']:.2f}", f"{m['rouge2']:.2f}", f"{m['rougeL']:.2f}", f"{m['mean_words']:.1f}",
                      f"{m['finish_reasons']['eos']}/{results['n_prompts']}", share(m["choices"]["fallback_rate"]),
                      share(m["choices"]["follows_aligner_argmax"]), f"{m['tokens_per_second'] or 0:.1f}")
    Console().print(table)


def train_summary_line(summary: dict, out) -> str:
    """The line ``align train`` ends with: steps, examples, wall-clock seconds, the last held-out loss (nats,
    the training loss on the held-out prompts), the pair's kept val evaluation (``--pairs``), where the aligner
    and the machine-readable summary (``OUT/train_summary.json``, the same ``summary``) were saved.

    Args:
        summary: :func:`amendlm.ram.train.train_aligner`'s return value for a run trained now.
        out: the run directory (``--out``).
    """
    from pathlib import Path

    from amendlm.ram.run_dir import SUMMARY_FILE

    seconds, this_run = summary["seconds"], summary.get("seconds_this_run")
    took = (("at least " if summary.get("seconds_complete") is False else "") + f"{seconds:.0f} s"
            + (f" ({this_run:.0f} s in this run)" if this_run is not None and round(this_run) != round(seconds) else ""))
    heldout = summary.get("heldout")
    loss = (f"held-out loss {heldout['loss']:.4f} ({summary['n_heldout']} examples held out)" if heldout
            else "no held-out loss (no examples held out)")
    parts = [f"trained {summary['steps']} steps on {summary['n_examples']} examples in {took}", loss]
    if summary.get("selection"):
        kept = summary["selection"].get("kept")
        parts.append(f"kept the val evaluation of step {kept['step']} (worst gap {kept['worst_gap']:.2f}, LMS drop "
                     f"{kept['lms_drop']:.2f})" if kept else "no val evaluation kept: the last step's weights")
    parts.append(f"aligner saved in {summary['aligner']} (summary: {Path(out) / SUMMARY_FILE})")
    return "; ".join(parts)
