"""``amendlm align {sample,train,generate,eval}``: thin Typer commands over :mod:`amendlm.ram`.

Each command parses its options into config dataclasses and calls one function; torch and
transformers are imported inside the command bodies so ``amendlm --help`` stays fast.  Invalid
options are usage errors; a bad file, row, field or model path is one line (``error: ...``, exit 1),
reported before any model loads and before any output is written.

Defaults shared by the four commands: ``--dtype auto`` (bf16 autocast where the device does bf16
natively fast, else fp32; outputs record the resolved dtype), documents cut to 128 tokens
(``--max-document-tokens``), greedy decoding in ``generate`` and ``eval`` (``--sample`` to draw;
``sample`` always draws, T 0.5), the aligner trained in full (``--lora`` for adapters), and stop
strings given by ``--stop`` (default: the task's, a newline for ``xsum-sample``; none for free
prompts in ``generate``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from amendlm.errors import check_out_directory, check_out_file, optional_name, required_in_help, user_errors
from amendlm.ram.command_helpers import decode_config, generate_and_print, print_eval_table, train_summary_line, val_split
from amendlm.resources import DEFAULT_MODEL

align_app = typer.Typer(
    help="Residual Alignment Model (RAM): sample the proposal, train an aligner, decode proposal x aligner.",
    no_args_is_help=True,
)

DATA_HELP = "Task: xsum-sample (embedded) or a jsonl/json/csv with prompt and response fields."
DTYPE_HELP = ("auto (bf16 autocast where the device does it natively fast, else fp32), fp32 or bf16 (emulated and "
              "slow on CPUs without bf16 units).")
BUDGET = 128  # document tokens; TaskConfig's default
BUDGET_HELP = "Cut each prompt's document to this many tokens (0 = no cut); sample, train and eval must agree."
STOP_HELP = ("Stop string, repeatable, escapes like \\n understood; default: the task's (xsum-sample: a newline, "
             "summaries are one sentence; a data file: none); --stop '' for none.")
PAIRS_HELP = ("Preference pairs instead of --samples: 'stereoset' (its train target terms; chosen = anti-stereotype, "
              "rejected = stereotype) or a jsonl/json/csv with prompt, chosen, rejected fields (raw text).")
ALIGNER_HELP = "Aligner Q: a model, or an 'align train' output directory (its aligner/ is used)."
CHAT_HELP = "Wrap prompts in the tokenizer's chat template; default: when the tokenizer has one."
DEVICE_HELP = ("cpu, auto (an accelerator when Accelerate finds one, else the CPU), or an accelerator type present here "
               "such as cuda (no index: under accelerate launch each process takes its own; choose cards with "
               "CUDA_VISIBLE_DEVICES).")
MODEL_DEVICE_HELP = "cpu, or an accelerator present here: cuda, cuda:1, mps, ..."
VAL_HELP = ("--split val: align train's {} that held the val prompts out; default: the run's when --aligner (else "
            "--finetuned) is an align train run directory (a different value is refused), else {}.")


def _check_early(device: str, accelerate: bool = False, out: Optional[Path] = None, out_dir: Optional[Path] = None,
                 example: str = "out.json") -> None:
    """A bad ``--device``, an ``out`` file or an ``out_dir`` directory that cannot be written: one line
    (``error: ...``), exit 1, before any model loads.

    ``accelerate``: ``align train`` (Accelerate places the model): ``auto`` or a device type, no index.
    ``example``: the file name suggested inside an ``out`` that is a directory."""
    from amendlm.distributed import check_device

    with user_errors():
        check_device(device, index=not accelerate)
        check_out_file(out, example=example)
        check_out_directory(out_dir)


def _task(data: str, split: str, limit: Optional[int], max_document_tokens: int, split_seed: int,
          chat_template: Optional[bool]):
    from amendlm.ram.data import TaskConfig

    return TaskConfig(data=data, split=split, limit=limit, max_document_tokens=max_document_tokens,
                      split_seed=split_seed, chat_template=chat_template)


def _stops(stop: Optional[List[str]]) -> tuple[str, ...] | None:
    """``--stop`` values with escapes decoded; ``None`` when not given (the task's default applies)."""
    return tuple(s.encode().decode("unicode_escape") for s in stop) if stop else None


def _bad(err: Exception):  # a KeyError's str() is its message quoted
    return typer.BadParameter(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))


def _require_inputs(missing: List[str]) -> None:
    """One usage error naming every missing input at once (not one per attempt)."""
    if missing:
        raise typer.BadParameter("missing " + (", ".join(missing[:-1]) + " and " if len(missing) > 1 else "") + missing[-1])


@align_app.command("sample")
def sample_command(
    proposal: str = typer.Option(DEFAULT_MODEL, help="Proposal model P_M: embedded name, local directory, local .gguf file or Hugging Face id."),
    data: str = typer.Option("xsum-sample", help=DATA_HELP),
    out: Path = typer.Option(..., help="Samples jsonl: a new file, or one an earlier run wrote (appended to; ids already present are skipped)."),
    split: str = typer.Option("train", help="train, test or all."),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts of the split."),
    max_document_tokens: int = typer.Option(BUDGET, help=BUDGET_HELP),
    split_seed: int = typer.Option(0, help="Seed of the hash split."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Default: when the tokenizer has one."),
    temperature: float = typer.Option(0.5, help="Sampling temperature (public code: 0.5)."),
    top_p: float = typer.Option(0.95, help="Nucleus (public code: 0.95)."),
    top_k: int = typer.Option(10, help="Top-k, 0 = off (public code: 10)."),
    repetition_penalty: float = typer.Option(1.05, help="CTRL repetition penalty (public code: 1.05)."),
    max_new_tokens: int = typer.Option(64, help="Tokens per sample at most."),
    stop: Optional[List[str]] = typer.Option(None, help=STOP_HELP),
    batch_size: int = typer.Option(8, help="Prompts decoded together."),
    seed: int = typer.Option(0, help="One generator seeded with SEED + (samples already in --out) draws the whole run."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("cpu", help=MODEL_DEVICE_HELP),
) -> None:
    """Draw one proposal sample y' ~ P_M(.|x) per training prompt (resumable)."""
    from amendlm.ram.sample import SampleConfig, sample_proposal

    try:
        config = SampleConfig(proposal=proposal, out=str(out), task=_task(data, split, limit, max_document_tokens, split_seed, chat_template),
                              temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                              max_new_tokens=max_new_tokens, stop=_stops(stop), batch_size=batch_size, seed=seed,
                              dtype=dtype, device=device)
    except (ValueError, KeyError) as err:
        raise _bad(err) from None
    _check_early(device, out=out, example="samples.jsonl")
    with user_errors():
        summary = sample_proposal(config, progress=True)
    typer.echo(f"{summary['sampled']} new samples ({summary['already_done']} already done) in {summary['seconds']:.0f} s -> {out}")


@align_app.command("train", cls=required_in_help("out"))
def train_command(
    out: Optional[Path] = typer.Option(None, show_default=False, help="Output directory (checkpoints, aligner/, logs, train_summary.json); rerun to resume, a finished run is kept."),
    samples: Optional[Path] = typer.Option(None, show_default=False, help="Proposal samples jsonl from 'align sample' (with --data). Required unless --pairs."),
    pairs: Optional[str] = typer.Option(None, help=PAIRS_HELP),
    aligner: Optional[str] = typer.Option(None, help="Initial aligner: any model with the proposal's vocabulary (or give --init-from-proposal-layers)."),
    proposal: str = typer.Option(DEFAULT_MODEL, help="Proposal model (for --init-from-proposal-layers; run beside the aligner with --pairs)."),
    init_from_proposal_layers: Optional[int] = typer.Option(None, help="Aligner = the proposal's first K blocks."),
    data: str = typer.Option("xsum-sample", help=DATA_HELP),
    limit: Optional[int] = typer.Option(None, help="Only the first N training prompts (or pairs)."),
    max_document_tokens: int = typer.Option(BUDGET, help=BUDGET_HELP),
    split_seed: int = typer.Option(0, help="Seed of the hash split (with --pairs stereoset: of the target-term split)."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help=CHAT_HELP),
    loss: str = typer.Option("residual", help="residual (-log Q(y|x) + alpha log Q(y'|x)) or dpo (reference-free, y chosen, y' rejected)."),
    alpha: float = typer.Option(1e-4, help="Weight of the proposal-sample term (RAM default 1e-4); 0 = SFT."),
    beta: float = typer.Option(1.0, help="DPO beta."),
    per_token: bool = typer.Option(False, help="Average log-probs per token instead of per-sequence sums."),
    lora: bool = typer.Option(False, "--lora/--full", help="LoRA adapters (merged at the end) or all weights (default)."),
    lora_r: int = typer.Option(8, help="LoRA rank (with --lora)."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha, scale alpha / r (with --lora)."),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout (with --lora)."),
    learning_rate: float = typer.Option(1e-4, help="AdamW peak learning rate."),
    epochs: int = typer.Option(1, help="Passes over the training prompts."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (default: all --epochs)."),
    batch_size: int = typer.Option(8, help="Prompts per micro-batch (under accelerate launch, of all processes together)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    save_every: int = typer.Option(50, help="Optimizer steps between checkpoints (and one at the final step)."),
    eval_fraction: float = typer.Option(0.05, help="Share of the training prompts held out (by id) for the held-out loss; 0 = none."),
    eval_every: int = typer.Option(0, help="Also log the held-out loss every N steps (0: before training, at epoch ends and the end)."),
    seed: int = typer.Option(0, help="Seed of the batch order, the held-out share and initialisation."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    zero_head: Optional[bool] = typer.Option(None, "--zero-head/--no-zero-head", help="Start from an all-zero aligner head "
                                             "(the pair = the proposal at step 0). Default: on with --pairs."),
    kl_weight: float = typer.Option(1.0, help="--pairs: weight of KL(proposal || pair) per position on neutral text; 0 = none."),
    kl_unrelated: bool = typer.Option(True, "--kl-unrelated/--no-kl-unrelated", help="--pairs: StereoSet's unrelated sentences of the train targets in the neutral set."),
    kl_texts: Optional[str] = typer.Option("xsum-sample", help="--pairs: general text of the neutral set, an embedded dataset or a jsonl/json/csv whose rows hold it in --kl-text-field ('none' or '' = StereoSet's unrelated sentences only)."),
    kl_text_field: str = typer.Option("document", help="--pairs: the field of the --kl-texts rows that holds the text (xsum-sample: document)."),
    kl_batch_size: int = typer.Option(8, help="--pairs: neutral examples per step."),
    val_every: int = typer.Option(20, help="--pairs: score the pair on StereoSet val targets every N steps (and at 0 and the end), keep the best; 0 = keep the last."),
    val_clusters: Optional[int] = typer.Option(None, help="--pairs: val clusters per evaluation (stratified; default all)."),
    max_lms_drop: float = typer.Option(2.0, help="--pairs: keep the smallest worst val |SS-50| among evaluations whose val LMS fell at most this."),
) -> None:
    """Train the aligner Q on targets and proposal samples, or on preference pairs (--pairs; Accelerate; full or LoRA).

    Ends with one line: the steps, the examples, the training seconds (those of this run too, when it resumed one), the last held-out loss (or that none was held out), the val evaluation kept (--pairs) and where the aligner and OUT/train_summary.json (the same summary as data) were saved.  A finished run is not trained again: the line says so and where its aligner is.
    """
    from amendlm.ram.losses import LossConfig
    from amendlm.ram.preference import PairsConfig
    from amendlm.ram.train import TrainConfig, train_aligner

    _require_inputs([name for name, given in (
        ("--out DIR", out is not None), ("--samples FILE (from 'align sample') or --pairs SOURCE", samples is not None or pairs is not None),
        ("the initial aligner (--aligner MODEL or --init-from-proposal-layers K)",
         aligner is not None or init_from_proposal_layers is not None)) if not given])
    try:
        pairs_config = None if pairs is None else PairsConfig(
            source=pairs, split_seed=split_seed, limit=limit, kl_weight=kl_weight, kl_unrelated=kl_unrelated,
            kl_texts=optional_name(kl_texts), kl_text_field=kl_text_field,
            kl_batch_size=kl_batch_size, val_every=val_every, val_clusters=val_clusters, max_lms_drop=max_lms_drop)
        config = TrainConfig(
            out=str(out), samples=None if samples is None else str(samples), pairs=pairs_config,
            zero_head=pairs is not None if zero_head is None else zero_head, aligner=aligner, proposal=proposal,
            init_from_proposal_layers=init_from_proposal_layers,
            task=_task(data if pairs is None else "xsum-sample", "train", None if pairs else limit, max_document_tokens,
                       split_seed, chat_template),  # unused with --pairs: the defaults are recorded
            loss=LossConfig(name=loss, alpha=alpha, beta=beta, per_token=per_token), lora=lora, lora_r=lora_r,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, learning_rate=learning_rate, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, save_every=save_every,
            eval_fraction=eval_fraction, eval_every=eval_every, seed=seed, dtype=dtype, device=device,
        )
    except (ValueError, KeyError) as err:
        raise _bad(err) from None
    _check_early(device, accelerate=True, out_dir=out)
    with user_errors():
        summary = train_aligner(config, progress=True)
    from amendlm.distributed import is_main_launched_process

    if not is_main_launched_process():  # under accelerate launch: one line from the main process
        return
    if summary["already_finished"]:
        typer.echo(f"{out} is already finished ({summary['steps']} steps); the aligner is {summary['aligner']} "
                   "(nothing trained; use a new --out to train again)")
        return
    typer.echo(train_summary_line(summary, out))


MODE_HELP = "par, par-kl, sir (seeded resampling, also with --greedy), sir-best (best of n), mds, proposal or aligner."


@align_app.command("generate")
def generate_command(
    prompts: List[str] = typer.Argument(None, help="Prompt texts; none = read one prompt per line from --prompts-file or stdin."),
    proposal: str = typer.Option(DEFAULT_MODEL, help="Proposal model P_M."),
    aligner: Optional[str] = typer.Option(None, help=ALIGNER_HELP + " Not needed for --mode proposal."),
    mode: str = typer.Option("par-kl", help=MODE_HELP),
    prompts_file: Optional[Path] = typer.Option(None, help="One prompt per line."),
    candidates: int = typer.Option(8, help="SIR: proposal draws per token."),
    kl_threshold: float = typer.Option(0.1, help="PAR-KL: switch to the proposal above this KL (nats)."),
    proposal_top_p: float = typer.Option(0.95), aligner_top_p: float = typer.Option(0.9),
    proposal_temperature: float = typer.Option(1.0), aligner_temperature: float = typer.Option(1.0),
    eos_priority: bool = typer.Option(True, "--eos-priority/--no-eos-priority"),
    max_new_tokens: int = typer.Option(64), greedy: bool = typer.Option(True, "--greedy/--sample", help="Argmax of the rule (default) or a seeded draw."),
    seed: int = typer.Option(0), stop: List[str] = typer.Option([], help="Stop string (repeatable; default none)."),
    batch_size: int = typer.Option(8), chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come (one prompt) or rows as they end."),
    out: Optional[Path] = typer.Option(None, help="Also write a jsonl with every generation."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP), device: str = typer.Option("cpu", help=MODEL_DEVICE_HELP),
) -> None:
    """Decode prompts with proposal x aligner, many at once, both models KV-cached."""
    from amendlm.ram.generate import GenerateConfig

    try:
        decode = decode_config(mode, candidates, kl_threshold, proposal_top_p, aligner_top_p, proposal_temperature,
                               aligner_temperature, eos_priority)
        config = GenerateConfig(max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, stop=_stops(stop) or (),
                                batch_size=batch_size, dtype=dtype)
    except (ValueError, KeyError) as err:
        raise _bad(err) from None
    _require_inputs([f"--aligner (for --mode {mode})"] if aligner is None and mode != "proposal" else [])
    _check_early(device, out=out, example="generations.jsonl")
    with user_errors():
        texts = list(prompts or [])
        if not texts:
            source = prompts_file.read_text(encoding="utf-8") if prompts_file else sys.stdin.read()
            texts = [line for line in source.splitlines() if line.strip()]
        if not texts:
            raise ValueError("no prompts given (as arguments, --prompts-file or stdin)")
        generate_and_print(texts, proposal, aligner if mode != "proposal" else None, decode, config, chat_template, stream, out, device)


@align_app.command("eval")
def eval_command(
    proposal: str = typer.Option(DEFAULT_MODEL, help="Proposal model P_M."),
    aligner: Optional[str] = typer.Option(None, help=ALIGNER_HELP),
    finetuned: Optional[str] = typer.Option(None, help="The proposal fine-tuned directly (upper baseline)."),
    systems: str = typer.Option("proposal,aligner,par,par-kl,sir,mds", help="Comma-separated; also sir-best, and finetuned with --finetuned."),
    data: str = typer.Option("xsum-sample", help=DATA_HELP),
    split: str = typer.Option("test", help="test (reported) or val (to decide on: the train prompts 'align train' held "
                              "out for its held-out loss, with the run's --eval-fraction and --seed)."),
    val_fraction: Optional[float] = typer.Option(None, help=VAL_HELP.format("--eval-fraction", 0.05)),
    val_seed: Optional[int] = typer.Option(None, help=VAL_HELP.format("--seed", 0)),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts of the split."),
    max_document_tokens: int = typer.Option(BUDGET, help=BUDGET_HELP), split_seed: int = typer.Option(0),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template"),
    candidates: int = typer.Option(8), kl_threshold: float = typer.Option(0.1),
    proposal_top_p: float = typer.Option(0.95), aligner_top_p: float = typer.Option(0.9),
    proposal_temperature: float = typer.Option(1.0), aligner_temperature: float = typer.Option(1.0),
    eos_priority: bool = typer.Option(True, "--eos-priority/--no-eos-priority"),
    max_new_tokens: int = typer.Option(64), greedy: bool = typer.Option(True, "--greedy/--sample", help="Argmax of each rule (default; sir still draws) or a seeded draw."),
    stop: Optional[List[str]] = typer.Option(None, help=STOP_HELP),
    seed: int = typer.Option(0), batch_size: int = typer.Option(8),
    out: Path = typer.Option(Path("ram_eval.json"), help="Results JSON (generations go beside it as .generations.jsonl)."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP), device: str = typer.Option("cpu", help=MODEL_DEVICE_HELP),
) -> None:
    """ROUGE-1/2/L and length of proposal, aligner, RAM modes (and a direct fine-tune) on held-out prompts."""
    from amendlm.ram.evaluate import SYSTEMS, AlignEvalConfig, evaluate_systems
    from amendlm.ram.generate import GenerateConfig
    from amendlm.report import atomic_write_json, package_versions

    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    need_aligner = [s for s in chosen if s in SYSTEMS and s not in ("proposal", "finetuned")]
    _require_inputs(([f"--aligner (for {', '.join(need_aligner)})"] if need_aligner and aligner is None else [])
                    + (["--finetuned (for finetuned)"] if "finetuned" in chosen and finetuned is None else []))
    if split not in ("test", "val") or (split == "test" and (val_fraction, val_seed) != (None, None)):
        raise typer.BadParameter(f"--split must be test or val, got {split!r}" if split not in ("test", "val")
                                 else "--val-fraction and --val-seed apply to --split val only")
    with user_errors():
        val = val_split(aligner, finetuned if "finetuned" in chosen else None, val_fraction, val_seed) if split == "val" else None
    try:
        task = _task(data, "train" if val else "test", limit, max_document_tokens, split_seed, chat_template)
        stops = _stops(stop)
        config = AlignEvalConfig(
            proposal=proposal, aligner=aligner, finetuned=finetuned,
            systems=chosen, task=task,
            decode=decode_config("par-kl", candidates, kl_threshold, proposal_top_p, aligner_top_p,
                                 proposal_temperature, aligner_temperature, eos_priority),
            generate=GenerateConfig(max_new_tokens=max_new_tokens, greedy=greedy, seed=seed,
                                    stop=task.stop if stops is None else stops, batch_size=batch_size, dtype=dtype),
            device=device, val=val,
        )
    except (ValueError, KeyError) as err:
        raise _bad(err) from None
    _check_early(device, out=out, example="ram_eval.json")
    from amendlm.ram.validation import run_of

    if val is not None and None in (val_fraction, val_seed) and not run_of(aligner) and not run_of(
            finetuned if "finetuned" in chosen else None):
        typer.echo(f"warning: --split val without an align train run directory: its held-out prompts are assumed to "
                   f"be --val-fraction {val.fraction:g}, --val-seed {val.seed} and cannot be checked", err=True)
    began = time.perf_counter()
    with user_errors():
        results = evaluate_systems(config, generations_path=str(out.with_suffix(".generations.jsonl")), progress=True)
        results.update(versions=package_versions(), seconds_total=time.perf_counter() - began)
        atomic_write_json(out, results)
    print_eval_table(results, data)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``align`` command group to the main app."""
    app.add_typer(align_app, name="align")
