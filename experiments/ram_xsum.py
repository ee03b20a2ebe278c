"""RAM with a small aligner on the embedded XSum task: does it beat its aligner alone, the proposal, a fine-tune?

The pipeline, each step resumable (Python API, as ``amendlm align`` calls it; a step whose recorded
configuration matches is reused, and sampling and training resume inside a step):

1. proposal samples ``y' ~ P_M`` for the training prompts (:func:`amendlm.ram.sample.sample_proposal`)
   -> ``runs/ram/samples.jsonl``;
2. optionally (``--warmup-steps``, default on) a distillation warm-up of the proposal's first K
   blocks towards the proposal on the training documents, those of the val prompts (the ones step 3 holds
   out) left out (:func:`amendlm.ram.distill.distill_aligner`):
   a cut decoder starts far from any language model, and the warm-up costs a few hundred steps;
3. the small aligner: those K blocks (embeddings, final norm and head included) trained in full with
   the residual loss, alpha 1e-4, held-out loss per epoch (:func:`amendlm.ram.train.train_aligner`);
4. the upper baselines: the proposal itself fine-tuned directly (alpha 0, plain SFT) on the same
   prompts, epochs and batch size, with LoRA and in full;
5. ``align eval`` of proposal, aligner alone, ``par``, ``par-kl``, ``sir``, ``mds`` and both fine-tunes on
   the held-out test prompts, greedy and sampled (T 0.5 for both models, three seeds), with 95 %
   paired-bootstrap intervals of each system's ROUGE-L minus the proposal's and the aligner's;
6. ``align eval --split val`` of proposal, aligner alone and the RAM modes on the training prompts the
   small aligner's training held out (val), per decoding and seed: the best RAM mode is the one with the
   best val ROUGE-L (sampled: mean over seeds), and the targets are read on its test row;
7. the `mds` aligner-temperature lever (``--aligner-temperatures``, default ``1,2,4,8``, quick ``1,2``: multiples
   of the decoding's temperature; under greedy `mds` only the aligner's weight 1/T_e in
   ``argmax log P_M + log Q / T_e`` matters, 1 = plain `mds`): `mds` alone on val at each other T_e
   (``val_{decoding}_s{seed}_mds-te{T_e}.json``); the T_e with the best val ROUGE-L (ties: the smaller), when
   not plain `mds`, is evaluated on test (``eval_..._mds-te{T_e}.json``), one more row and a candidate for the
   best RAM mode by its val ROUGE-L (:mod:`ram_xsum_common`);
8. why a target is missed (:mod:`ram_why_common`): the val references' NLL under the token-level product
   ``softmax(log P_M + w log Q)`` that `mds` decodes, w = 0 and 1/T_e over the grid (``val_product_nll.json``),
   beside each training's held-out loss, the argmax-follow rates and the lengths.

    python experiments/ram_xsum.py                                  # 799/200 prompts, K = 8 of 30 blocks
    python experiments/ram_xsum.py --device cuda --train-dtype auto
    python experiments/ram_xsum.py --decodings greedy
    python experiments/ram_xsum.py --quick --results-dir /tmp/r     # a few prompts and steps
    python experiments/ram_xsum.py --render-available               # the tables of what is recorded so far
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

from amendlm.ram import run_dir
from amendlm.unlearn.artifacts import read_log
from common import REPO, Experiment, resolved_dtype
from ram_common import (
    FINETUNES, RAM_MODES, best_ram_mode, fallback_caveat, headline_row, mode_choice, paired_intervals, plot_training,
    recorded_eval, recorded_training, systems_table, target_rows, targets_table, without_added,
)
from ram_why_common import STEP as PRODUCT_STEP, product_nll, reference_words, short_why, why_missed
from ram_xsum_common import (
    MDS_AT, aligner_temperature_of, describe, mds_temperatures, pending_reason, ram_candidates, rows_of,
    temperature_labels, temperature_note, temperatures_option, verdict, with_rows_after,
)


class Budget(NamedTuple):
    """How much of the task a run uses."""

    train_limit: int | None  # training prompts (None: all 799; 5 % of them held out)
    test_limit: int | None  # held-out prompts (None: all 200)
    epochs: int  # of every training
    batch_size: int  # prompts per training step
    max_document_tokens: int
    max_new_tokens: int  # sampling and evaluation
    sample_batch_size: int
    eval_batch_size: int
    warmup_steps: int  # distillation warm-up steps (0 = none)
    warmup_tokens: int  # tokens per warm-up text
    seeds: tuple[int, ...]  # of the sampled decoding
    aligner_temperatures: tuple[float, ...]  # of `mds`, x the decoding's temperature (1: plain mds)


FULL = Budget(None, None, 3, 8, 128, 48, 16, 8, 300, 128, (0, 1, 2), (1.0, 2.0, 4.0, 8.0))
QUICK = Budget(4, 3, 1, 2, 32, 4, 4, 3, 2, 16, (0,), (1.0, 2.0))
SAMPLED_TEMPERATURE = 0.5  # both models' temperature in the sampled decoding (the public code's range: 0.3-0.7)


def decodings(seeds: tuple[int, ...], which: list[str]) -> dict[str, dict]:
    """Decoding name -> ``{"greedy", "temperature", "seeds"}``: ``greedy`` (argmax; ``sir`` still draws, seed 0)
    and ``sampled`` (T :data:`SAMPLED_TEMPERATURE`, every seed)."""
    known = {"greedy": {"greedy": True, "temperature": 1.0, "seeds": [0]},
             "sampled": {"greedy": False, "temperature": SAMPLED_TEMPERATURE, "seeds": list(seeds)}}
    return {name: known[name] for name in which}


class Pipeline:
    """The configuration of every step, and each step run (or reused) on demand."""

    def __init__(self, exp: Experiment, args, budget: Budget):
        from amendlm.ram.data import TaskConfig
        from amendlm.ram.distill import DistillConfig
        from amendlm.ram.losses import LossConfig
        from amendlm.ram.sample import SampleConfig
        from amendlm.ram.train import TrainConfig
        from amendlm.ram.validation import ValSplit

        self.exp, self.args, self.budget = exp, args, budget
        self.unavailable: dict[str, str] = {}  # --render-available: step -> why it is not shown
        runs = (exp.results_root / "runs" if exp.quick else REPO / "runs") / "ram"
        b, k = budget, args.aligner_layers
        self.train_task = TaskConfig(split="train", limit=b.train_limit, max_document_tokens=b.max_document_tokens)
        self.test_task = TaskConfig(split="test", limit=b.test_limit, max_document_tokens=b.max_document_tokens)
        self.val_task = TaskConfig(split="train", max_document_tokens=b.max_document_tokens)  # every held-out prompt
        self.sample = SampleConfig(proposal=args.proposal, out=self.shown(runs / "samples.jsonl"), task=self.train_task,
                                   max_new_tokens=b.max_new_tokens, batch_size=b.sample_batch_size, dtype=args.dtype,
                                   device=args.device)
        common = dict(samples=self.sample.out, proposal=args.proposal, task=self.train_task, epochs=b.epochs,
                      batch_size=b.batch_size, log_every=1 if exp.quick else 5, dtype=args.train_dtype, device=args.device)
        warm = runs / f"warmup{k}"
        small = (dict(aligner=self.shown(warm / "aligner")) if b.warmup_steps else dict(init_from_proposal_layers=k))
        self.trainings = {
            f"small{k}": TrainConfig(out=self.shown(runs / f"small{k}"), loss=LossConfig(alpha=args.alpha), lora=False,
                                     learning_rate=args.aligner_lr, **small, **common),
            "sft-lora": TrainConfig(out=self.shown(runs / "sft-lora"), aligner=args.proposal, loss=LossConfig(alpha=0.0),
                                    lora=True, learning_rate=args.lora_lr, **common),
            "sft-full": TrainConfig(out=self.shown(runs / "sft-full"), aligner=args.proposal, loss=LossConfig(alpha=0.0),
                                    lora=False, learning_rate=args.full_lr, **common)}
        # the warm-up leaves out the documents of the prompts the small aligner's training holds out (val)
        self.warmup = DistillConfig(out=self.shown(warm), proposal=args.proposal, layers=k, task=self.train_task,
                                    holdout=ValSplit.of_training(self.trainings[f"small{k}"]),
                                    max_tokens=b.warmup_tokens, steps=b.warmup_steps, batch_size=b.batch_size,
                                    dtype=args.train_dtype, device=args.device) if b.warmup_steps else None
        self.small = f"small{k}"

    @staticmethod
    def shown(path: Path) -> str:
        """A path as configurations record it: relative to the repository when inside it."""
        path = Path(path)
        return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else str(path)

    def _dtype(self, config) -> str:
        """The dtype a step runs in: ``auto`` resolved on this machine, unless the step's run directory
        already resolved it (a training resumes, and a finished run stays, in the dtype its start chose;
        a finished warm-up likewise), so recorded steps stay reusable on a machine that resolves otherwise."""
        out = Path(getattr(config, "out", "") or ".")
        out = out if out.is_absolute() else REPO / out
        if config.dtype == "auto" and (out / "distill_summary.json").is_file():
            saved = _read(out / "distill_config.json")
            if saved.get("dtype_auto"):
                return saved["dtype"]
        if config.dtype == "auto" and (out / run_dir.CONFIG_FILE).is_file():
            return resolved_dtype(run_dir.resume_dtype(config.dtype, out), config.device)
        return resolved_dtype(config.dtype, config.device)

    # ------------------------------------------------------------------ configurations (what each step depends on)
    def sample_expected(self) -> dict:
        return {**asdict(self.sample), "dtype": self._dtype(self.sample)}

    def warmup_expected(self) -> dict | None:
        return {**asdict(self.warmup), "dtype": self._dtype(self.warmup)} if self.warmup else None

    def train_expected(self, name: str) -> dict:
        config = self.trainings[name]
        upstream = {"warmup": self.warmup_expected()} if name == self.small else {}
        return {**without_added(asdict(config)), "dtype": self._dtype(config), "samples": self.sample_expected(), **upstream}

    def eval_config(self, group: str, decoding: dict, seed: int, split: str = "test"):
        """``align eval`` of one group on ``test``, or (not a fine-tune) on ``val``: the prompts the small aligner's
        training held out (its eval fraction, seed, samples and prompt limit).  A group ``mds-te{T}``
        (``ram_xsum_common.mds_at``): the RAM group's configuration with `mds` alone at aligner temperature T."""
        from amendlm.ram.decoding import DecodeConfig
        from amendlm.ram.evaluate import AlignEvalConfig
        from amendlm.ram.generate import GenerateConfig
        from amendlm.ram.validation import ValSplit

        if group.startswith(MDS_AT):  # `mds` alone at another aligner temperature, else the RAM group's configuration
            config = self.eval_config("ram", decoding, seed, split)
            return replace(config, systems=["mds"], decode=replace(config.decode, aligner_temperature=aligner_temperature_of(group)))
        t = decoding["temperature"]
        generate = GenerateConfig(max_new_tokens=self.budget.max_new_tokens, greedy=decoding["greedy"], seed=seed,
                                  stop=self.test_task.stop, batch_size=self.budget.eval_batch_size,
                                  dtype=resolved_dtype(self.args.dtype, self.args.device))
        decode = DecodeConfig(mode="par-kl", proposal_temperature=t, aligner_temperature=t)
        small = self.trainings[self.small]
        if split == "val":
            val = ValSplit.of_training(small)
            return AlignEvalConfig(proposal=self.args.proposal, aligner=f"{small.out}/aligner",
                                   systems=["proposal", "aligner", *RAM_MODES], task=self.val_task, decode=decode,
                                   generate=generate, device=self.args.device, val=val)
        if group == "ram":
            return AlignEvalConfig(proposal=self.args.proposal, aligner=f"{small.out}/aligner",
                                   systems=["proposal", "aligner", *RAM_MODES], task=self.test_task, decode=decode,
                                   generate=generate, device=self.args.device)
        return AlignEvalConfig(proposal=self.args.proposal, aligner=None, finetuned=f"{self.trainings[group].out}/aligner",
                               systems=["finetuned"], task=self.test_task, decode=decode, generate=generate,
                               device=self.args.device)

    def eval_expected(self, group: str, decoding: dict, seed: int, split: str = "test") -> dict:
        trained = group if group in FINETUNES else self.small
        return {**asdict(self.eval_config(group, decoding, seed, split)), "trained": self.train_expected(trained)}

    # ------------------------------------------------------------------ steps
    def _recorded(self, path: Path, expected: dict, recorded=None) -> dict | None:
        """``--render-available``: the recorded step, or None with the reason kept in :attr:`unavailable`."""
        data, differs = self.exp.recorded_step(path, expected, recorded)
        if data is None:
            self.unavailable[path.stem] = ("not run yet" if differs is None else
                                           f"recorded with another configuration ({', '.join(differs)})")
        return data

    def samples(self) -> dict:
        """Step 1 (a samples file drawn before with the same configuration is resumed, so reused)."""
        from amendlm.ram.sample import sample_proposal

        with _in_repo():
            return self.exp.step(self.exp.results / "samples.json", self.sample_expected(), lambda: sample_proposal(self.sample))

    def warmed(self) -> dict | None:
        """Step 2: the distillation warm-up of the cut aligner (None when ``--warmup-steps 0``)."""
        from amendlm.ram.distill import distill_aligner

        if self.warmup is None:
            return None

        def compute():
            summary = distill_aligner(self.warmup)
            return {"summary": summary, "log": read_log(Path(self.warmup.out) / "distill_log.jsonl")}

        path = self.exp.results / f"warmup{self.args.aligner_layers}.json"
        if self.args.render_available:
            return self._recorded(path, self.warmup_expected())
        with _in_repo():
            return self.exp.step(path, self.warmup_expected(), compute)

    def trained(self, name: str) -> dict | None:
        """Steps 3-4: one training (the small aligner or a direct fine-tune), with its log (with
        ``--render-available``: the recorded one, None when it is not done)."""
        from amendlm.ram.train import train_aligner

        def compute():
            self.samples()
            if name == self.small:
                self.warmed()
            summary = train_aligner(self.trainings[name])
            out = Path(self.trainings[name].out)
            return {"summary": summary, "train_config": _read(out / "train_config.json"), "log": read_log(out / "train_log.jsonl")}

        path = self.exp.results / f"train_{name}.json"
        if self.args.render_available:
            return self._recorded(path, self.train_expected(name), recorded_training)
        with _in_repo():
            return self.exp.step(path, self.train_expected(name), compute, recorded=recorded_training)

    def eval_path(self, group: str, decoding_name: str, seed: int | str, split: str = "test") -> Path:
        """The recorded file of one evaluation step, e.g. ``results/ram_xsum/val_greedy_s0_ram.json``."""
        return self.exp.results / f"{'eval' if split == 'test' else split}_{decoding_name}_s{seed}_{group}.json"

    def evaluated(self, group: str, decoding_name: str, decoding: dict, seed: int, split: str = "test") -> dict | None:
        """Steps 5-7: one ``align eval`` (the RAM group, `mds` at another aligner temperature, or one fine-tune; on
        ``test``, or ``val``) for one decoding and seed (with ``--render-available``: the recorded one, None when it is not done)."""
        from amendlm.ram.evaluate import evaluate_systems

        path = self.eval_path(group, decoding_name, seed, split)
        expected = self.eval_expected(group, decoding, seed, split)

        def compute():
            self.trained(group if group in FINETUNES else self.small)
            return evaluate_systems(self.eval_config(group, decoding, seed, split),
                                    generations_path=str(path.with_suffix(".generations.jsonl")))

        if self.args.render_available:
            return self._recorded(path, expected, recorded_eval)
        with _in_repo():
            return self.exp.step(path, expected, compute, recorded=recorded_eval)


def _in_repo():
    import contextlib

    return contextlib.chdir(REPO)  # model and run paths in the configurations are the repository's


def _read(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--proposal", default="smollm2-135m-instruct", help="Proposal model P_M.")
        parser.add_argument("--aligner-layers", type=int, default=8, help="K: the small aligner's blocks (of the proposal's 30).")
        parser.add_argument("--warmup-steps", type=int, default=None, help="Distillation warm-up steps (0 = none; default 300, quick 2).")
        parser.add_argument("--epochs", type=int, default=None, help="Epochs of every training (default 3, quick 1).")
        parser.add_argument("--alpha", type=float, default=1e-4, help="Weight of the proposal-sample term (RAM default).")
        parser.add_argument("--aligner-lr", type=float, default=1e-4, help="AdamW LR of the small aligner (all weights).")
        parser.add_argument("--lora-lr", type=float, default=3e-4, help="AdamW LR of the LoRA fine-tune of the proposal.")
        parser.add_argument("--full-lr", type=float, default=2e-5, help="AdamW LR of the full fine-tune of the proposal.")
        parser.add_argument("--decodings", default="greedy,sampled", help="greedy and/or sampled (T 0.5, three seeds).")
        parser.add_argument("--train-dtype", default="auto", help="Training dtype (auto: bf16 where native).")
        parser.add_argument("--dtype", default="fp32", help="Sampling and evaluation dtype.")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--aligner-temperatures", type=temperatures_option, default=None,
                            help="`mds` aligner temperatures tried on val, x the decoding's (1 = plain mds, always in; "
                                 "default 1,2,4,8, quick 1,2); the best on val gets a test row.")
        parser.add_argument("--render-available", action="store_true",
                            help="Compute nothing: render the tables from the steps already recorded, listing those not done.")

    exp, args = Experiment.start("ram_xsum", "RAM with a small aligner on XSum: proposal, aligner alone, RAM modes, direct fine-tunes",
                                 argv, options)
    budget = QUICK if args.quick else FULL
    budget = budget._replace(**{k: v for k, v in (("warmup_steps", args.warmup_steps), ("epochs", args.epochs),
                                                  ("aligner_temperatures", args.aligner_temperatures)) if v is not None})
    chosen = decodings(budget.seeds, [d.strip() for d in args.decodings.split(",") if d.strip()])
    pipeline = Pipeline(exp, args, budget)
    labels = {"proposal": "proposal alone", "aligner": f"small aligner alone ({args.aligner_layers} blocks)",
              "sft-lora": "proposal fine-tuned (LoRA SFT)", "sft-full": "proposal fine-tuned (full SFT)",
              **{m: f"RAM `{m}`" for m in RAM_MODES}}
    tables, summary, sources, headline, n_vals = [], {"decodings": {}}, [], [], set()
    table_of, test_paths = {}, {}  # decoding -> its index in tables, its test eval files
    for name, decoding in chosen.items():
        rows, paths, n_prompts, skipped = rows_of(pipeline, name, decoding)
        if n_prompts is None:  # only with --render-available: nothing of this decoding is complete
            continue
        val, val_paths, n_val, val_skipped = rows_of(pipeline, name, decoding, "val")
        temps = mds_temperatures(pipeline, name, decoding, val, budget.aligner_temperatures)  # mds's T_e, chosen on val
        val, rows = {**val, **temps["val_rows"]}, with_rows_after(rows, "mds", temps["test_rows"])
        step = pipeline.eval_path("ram", name, "*" if len(decoding["seeds"]) > 1 else decoding["seeds"][0], "val").stem
        pending = ([step] if val_skipped else []) + temps["missing"]  # no choice while any val step is missing
        mode = None if pending else best_ram_mode(val, ram_candidates(temps["row"]))  # on val only, never on test
        intervals = paired_intervals(rows)
        targets = target_rows(rows, intervals, mode)
        title = ("Greedy decoding" if decoding["greedy"] else
                 f"Sampled decoding (T {decoding['temperature']:g}, mean of seeds {', '.join(map(str, decoding['seeds']))})")
        test_labels, val_labels = temperature_labels(temps, decoding["temperature"])
        note = temperature_note(temps, decoding["temperature"])
        table_of[name], test_paths[name] = len(tables), paths
        tables.append(f"**{title}**, {n_prompts} held-out test prompts\n\n{systems_table(rows, intervals, {**labels, **test_labels})}"
                      f"\n\n{mode_choice(val, mode, n_val, {**labels, **val_labels}, pending, rows, temps['best_row'])}"
                      + (f"\n\n{note}" if note else "") + (f"\n\n{targets_table(targets, labels)}" if targets else ""))
        summary["decodings"][name] = {**decoding, "n_prompts": n_prompts, "intervals": intervals, "targets": targets,
                                      "systems": {s: {k: v for k, v in r.items() if k != "per_prompt_rougeL"} for s, r in rows.items()},
                                      "best_mode": mode, "val": None if mode is None else
                                      {"n_prompts": n_val, "rougeL": {s: r["rougeL"] for s, r in val.items()}},
                                      "mds_aligner_temperature": {k: temps[k] for k in ("val_rougeL", "chosen", "row", "missing")}}
        sources += paths + val_paths + temps["paths"]
        if mode:
            n_vals.add(n_val)
        if decoding["greedy"]:
            why = pending_reason(pending, step)
            headline.append(headline_row(targets, rows, skipped, args.aligner_layers, mode, why))
    trainings = {name: pipeline.trained(name) for name in pipeline.trainings}
    trainings = {name: t for name, t in trainings.items() if t is not None}
    if pipeline.small not in trainings or not tables:
        raise SystemExit("ram_xsum --render-available: nothing to render yet ("
                         + "; ".join(f"{k}: {v}" for k, v in pipeline.unavailable.items()) + ")")
    summary["not_done"] = pipeline.unavailable
    logs = {name: t["log"] for name, t in trainings.items()}
    warm = pipeline.warmed()
    if warm:
        logs = {f"warmup{args.aligner_layers}": warm["log"], **logs}
    summary["heldout_per_epoch"] = {name: [r for r in t["log"] if r.get("event") == "heldout"] for name, t in trainings.items()}
    product = product_nll(pipeline, _in_repo)  # the RAM product's likelihood of the val references: part of the why
    summary["product_nll"] = product and {"n_prompts": product["n_prompts"], "nll": product["nll"]}
    sources += [exp.results / f"{PRODUCT_STEP}.json"] if product else []
    for name, entry in summary["decodings"].items():
        why = why_missed(entry, summary["heldout_per_epoch"], pipeline.small, product, reference_words(test_paths[name]), labels)
        tables[table_of[name]] += f"\n\n{why}" if why else ""
    first = chosen[next(iter(chosen))]
    summary["config"] = {"budget": budget._asdict(), "eval": pipeline.eval_expected("ram", first, 0),
                         "val_eval": pipeline.eval_expected("ram", first, 0, "val")}
    pngs = [p for p in [plot_training(logs, exp.results / "training.png")] if p]
    sources += [exp.results / f"train_{name}.json" for name in trainings] + [exp.results / "samples.json"]
    notes = describe(pipeline, trainings, " / ".join(map(str, sorted(n_vals))) or None)
    for name, entry in summary["decodings"].items():
        best = entry["targets"][0]["mode"] if entry["targets"] else None
        if best and fallback_caveat(entry["systems"], best):
            notes += (f"  \n{name}: the best mode `{best}`{fallback_caveat(entry['systems'], best)}, so it is nearly the "
                      "proposal itself; its lead over the aligner alone is the proposal's.")
    if args.render_available:  # the page names the command that computes everything, not this rendering
        exp.command = shlex.join(part for part in shlex.split(exp.command) if part != "--render-available")
    if pipeline.unavailable:
        notes = ("**Partial.** Every row shown is complete; not shown: "
                 + "; ".join(f"`{k}` ({v})" for k, v in pipeline.unavailable.items())
                 + f". `{exp.command}` computes the rest (resumable).  \n{notes}")
    exp.finish(summary, "\n\n".join(tables), notes=notes, pngs=pngs, sources=sources, headline=headline,
               readme_blocks={"ram_xsum.verdict": verdict(summary["decodings"], "python experiments/ram_xsum.py",
                                                         short_why(summary["heldout_per_epoch"], pipeline.small, product,
                                                                   summary["decodings"].get("greedy", {}).get("best_mode")))})
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
