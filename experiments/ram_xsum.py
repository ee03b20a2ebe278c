"""RAM on the embedded XSum task: ROUGE of the proposal, the aligner, each RAM mode and a direct fine-tune.

The pipeline, each step resumable (Python API, as ``amendlm align`` calls it):

1. proposal samples ``y' ~ P_M`` for the training prompts (:func:`amendlm.ram.sample.sample_proposal`)
   -> ``runs/ram/samples.jsonl``;
2. the aligner: a LoRA copy of the proposal trained with the residual loss, alpha 1e-4
   (:func:`amendlm.ram.train.train_aligner`) -> ``runs/ram/aligner``;
3. the upper baseline: the same LoRA training with alpha 0 (plain SFT) -> ``runs/ram/sft``;
4. ``align eval`` (:func:`amendlm.ram.evaluate.evaluate_systems`) of proposal, aligner, par,
   par-kl, sir, mds and finetuned on the held-out prompts: ROUGE-1/2/L, words, rows ended by EOS.

A system is done when an eval JSON with the same configuration covers it (``results/ram/eval_a.json``
and ``eval_b.json`` from two ``align eval`` runs, or this script's ``results/ram_xsum/eval_*.json``);
only the others are decoded, into a new JSON.  Training and sampling run only when an evaluation
needs their model (the configuration of every eval includes its models' training configuration).

    python experiments/ram_xsum.py     # 799/200 prompts, 50 LoRA steps x 8, bf16 training, fp32 sampling/eval
    python experiments/ram_xsum.py --quick --results-dir /tmp/r   # 4 train / 2 test prompts, 1 step (~60-75 s)

From scratch the full run takes about 1.6 h on one CPU thread (recorded: sampling 463 of the 799
prompts 492 s, aligner training 1,044 s, SFT 1,093 s, decoding 200 prompts 226-540 s per system,
2,694 s for all seven); with the committed results it only renders the table (seconds).  The quick
run trains in ``auto`` dtype (bf16 only where the CPU has bf16 units; emulated bf16 is ~8x slower).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from amendlm.report import atomic_save_figure
from amendlm.unlearn.artifacts import read_log
from common import REPO, Experiment, config_differences, markdown_table, read_json, resolved_dtype

SYSTEMS = ("proposal", "aligner", "par", "par-kl", "sir", "mds", "finetuned")
LABELS = {"proposal": "proposal alone", "aligner": "aligner alone", "finetuned": "proposal fine-tuned directly (LoRA SFT)"}
RAM_MODES = ("par", "par-kl", "sir", "mds")
# the target this table is read against (amendlm's RAM acceptance criterion): a RAM mode beats the
# proposal and the aligner alone in ROUGE-L and is within this many points of the direct fine-tune
TARGET_ROUGE_L_GAP_TO_FINETUNED = 1.0


class Budget(NamedTuple):
    """How much of the task a run uses (the full budget is the published one)."""

    train_limit: int | None  # training prompts (None: all 799)
    test_limit: int | None  # held-out prompts (None: all 200)
    max_steps: int  # optimizer steps of each training
    batch_size: int  # prompts per training step
    max_document_tokens: int
    max_new_tokens: int  # sampling and evaluation
    sample_batch_size: int
    eval_batch_size: int


FULL = Budget(None, None, 50, 8, 128, 48, 16, 8)
QUICK = Budget(4, 2, 1, 2, 32, 4, 4, 2)


def project(recorded, expected):
    """``recorded`` cut to the keys of ``expected``, recursively (what a record says beyond them is ignored)."""
    if isinstance(recorded, dict) and isinstance(expected, dict):
        return {k: project(recorded[k], v) for k, v in expected.items() if k in recorded}
    return recorded


class Pipeline:
    """The configurations of every step, and each step run (or reused) on demand."""

    def __init__(self, exp: Experiment, args, budget: Budget):
        from amendlm.ram.data import TaskConfig
        from amendlm.ram.decoding import DecodeConfig
        from amendlm.ram.evaluate import AlignEvalConfig
        from amendlm.ram.generate import GenerateConfig
        from amendlm.ram.losses import LossConfig
        from amendlm.ram.sample import SampleConfig
        from amendlm.ram.train import TrainConfig

        self.exp, self.legacy = exp, exp.path("ram")  # results/ram: the files of the CLI run
        self.runs = (exp.results_root / "runs" if exp.quick else REPO / "runs") / "ram"
        b = budget
        train_task = TaskConfig(split="train", limit=b.train_limit, max_document_tokens=b.max_document_tokens)
        test_task = TaskConfig(split="test", limit=b.test_limit, max_document_tokens=b.max_document_tokens)
        self.sample_config = SampleConfig(proposal=args.proposal, out=self.shown(self.runs / "samples.jsonl"), task=train_task,
                                          max_new_tokens=b.max_new_tokens, batch_size=b.sample_batch_size,
                                          dtype=args.dtype, device=args.device)
        self.train_configs = {kind: TrainConfig(
            out=self.shown(self.runs / kind), samples=self.sample_config.out, aligner=args.aligner_init, proposal=args.proposal,
            task=train_task, loss=LossConfig(alpha=alpha), lora=True, learning_rate=args.learning_rate,
            max_steps=b.max_steps, batch_size=b.batch_size, dtype=args.train_dtype, device=args.device)
            for kind, alpha in (("aligner", args.alpha), ("sft", 0.0))}
        self.eval_config = AlignEvalConfig(
            proposal=args.proposal, aligner=self.shown(self.runs / "aligner" / "aligner"),
            finetuned=self.shown(self.runs / "sft" / "aligner"), systems=list(args.systems), task=test_task,
            decode=DecodeConfig(mode="par-kl"), device=args.device,
            generate=GenerateConfig(max_new_tokens=b.max_new_tokens, greedy=True, stop=test_task.stop,
                                    batch_size=b.eval_batch_size, dtype=args.dtype))

    @staticmethod
    def shown(path: Path) -> str:
        """A path as configurations record it: relative to the repository when inside it."""
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    # ------------------------------------------------------------------ configurations
    def sample_expected(self) -> dict:
        return {**asdict(self.sample_config), "dtype": resolved_dtype(self.sample_config.dtype, self.sample_config.device)}

    def train_expected(self, kind: str) -> dict:
        config = self.train_configs[kind]
        return {**asdict(config), "dtype": resolved_dtype(config.dtype, config.device), "samples_config": self.sample_expected()}

    def eval_expected(self, group: list[str]) -> dict:
        c = self.eval_config
        expected = {"proposal": c.proposal, "aligner": c.aligner, "task": asdict(c.task), "decode": asdict(c.decode),
                    "generate": {**asdict(c.generate), "dtype": resolved_dtype(c.generate.dtype, c.device)},
                    "device": c.device, "aligner_train": self.train_expected("aligner"), "systems_covered": sorted(group)}
        if "finetuned" in group:
            expected.update(finetuned=c.finetuned, finetuned_train=self.train_expected("sft"))
        return expected

    # ------------------------------------------------------------------ what files record
    def legacy_train(self, kind: str) -> dict:
        """A training configuration as the CLI run's copies record it (with its samples' configuration)."""
        record = read_json(self.legacy / f"{kind}_train_config.json")
        return {**record, "samples_config": read_json(self.legacy / "samples.jsonl.config.json").get("config")} if record else {}

    def eval_recorded(self, data: dict, group: list[str]) -> dict:
        if "step_config" in data:
            have = dict(data["step_config"])
        else:  # an `align eval` JSON of the CLI run: its models' training is recorded beside it
            have = {**data["config"], "aligner_train": self.legacy_train("aligner"), "finetuned_train": self.legacy_train("sft")}
        have["systems_covered"] = sorted(set(data["systems"]) & set(group))
        return project(have, self.eval_expected(group))

    def train_record(self, kind: str) -> tuple[Path | None, dict]:
        """The record of a training with this configuration (this script's, or the CLI run's copy), if any."""
        return self.matching_record(self.train_expected(kind), [
            (self.exp.results / f"{kind}_train.json", lambda d: d.get("step_config")),
            (self.legacy / f"{kind}_train_config.json", lambda d: self.legacy_train(kind))])

    def sample_record(self) -> tuple[Path | None, dict]:
        """The record of proposal samples with this configuration (this script's, or the CLI run's copy), if any."""
        return self.matching_record(self.sample_expected(), [(self.exp.results / "samples.json", lambda d: d.get("step_config")),
                                                             (self.legacy / "samples.jsonl.config.json", lambda d: d.get("config"))])

    @staticmethod
    def matching_record(expected: dict, candidates) -> tuple[Path | None, dict]:
        for path, stated in candidates:
            data = read_json(path)
            if data and not config_differences(expected, project(stated(data) or {}, expected)):
                return path, data
        return None, {}

    # ------------------------------------------------------------------ steps
    def samples(self) -> dict:
        """Step 1: the proposal samples (reused while the samples file exists)."""
        from amendlm.ram.sample import sample_proposal

        out = REPO / self.sample_config.out
        expected = {**self.sample_expected(), "samples_file": self.sample_config.out}

        def recorded(data):
            have = data.get("step_config") or {**data.get("config", {}), "samples_file": self.sample_config.out}
            return {**project(have, expected), "samples_file": self.sample_config.out if out.is_file() else None}

        def compute():
            beside = read_json(out.with_name(out.name + ".config.json")).get("config", {})
            if out.is_file() and config_differences(self.sample_expected(), project(beside, self.sample_expected())):
                raise ValueError(f"{out} holds samples drawn with another configuration; move it away to sample anew")
            return sample_proposal(self.sample_config)

        path = self.first_match([self.exp.results / "samples.json", self.legacy / "samples.jsonl.config.json"], expected, recorded)
        return self.exp.step(path, expected, compute, recorded)

    def trained(self, kind: str) -> str:
        """Steps 2-3: the trained aligner (``aligner``) or direct fine-tune (``sft``); returns its model path."""
        from amendlm.ram.train import train_aligner

        config, out = self.train_configs[kind], REPO / self.train_configs[kind].out
        model = self.shown(out / "aligner")
        expected = {**self.train_expected(kind), "saved_model": model}

        def recorded(data):
            have = data.get("step_config") or {**data, "samples_config": self.legacy_train(kind).get("samples_config")}
            return {**project(have, expected), "saved_model": model if (out / "aligner" / "config.json").is_file() else None}

        def compute():
            beside, fields = read_json(out / "train_config.json"), self.train_expected(kind)
            fields = {k: v for k, v in fields.items() if k != "samples_config"}  # what OUT/train_config.json records
            if beside and config_differences(fields, project(beside, fields)):
                raise ValueError(f"{out} holds a training with another configuration; move it away to train anew")
            self.samples()
            summary = train_aligner(config)
            return {"summary": summary, "train_config": read_json(out / "train_config.json"), "log": read_log(out / "train_log.jsonl")}

        path = self.first_match([self.exp.results / f"{kind}_train.json", self.legacy / f"{kind}_train_config.json"], expected, recorded)
        self.exp.step(path, expected, compute, recorded)
        return model

    def evaluations(self) -> dict[str, tuple[Path, dict]]:
        """Step 4: every system's results, from the first eval JSON that covers it, else decoded anew."""
        from amendlm.ram.evaluate import evaluate_systems
        from amendlm.report import package_versions

        systems, groups = list(self.eval_config.systems), []
        candidates = sorted(self.legacy.glob("eval_*.json")) + sorted(self.exp.results.glob("eval_*.json"))
        for path in candidates:
            data, covers = read_json(path), []
            for system in [s for s in systems if s in data.get("systems", {})]:
                differs = config_differences(self.eval_expected([system]), self.eval_recorded(data, [system]))
                if differs:
                    print(f"[{self.exp.name}] {path.relative_to(self.exp.results_root)} does not cover {system}: "
                          f"configuration differs in {differs}", flush=True)
                else:
                    covers.append(system)
            if covers:
                groups.append((path, covers))
                systems = [s for s in systems if s not in covers]
        if systems:
            groups.append((self.exp.results / f"eval_{'_'.join(systems)}.json", systems))

        def compute(group, path):
            from dataclasses import replace

            self.trained("aligner")
            if "finetuned" in group:
                self.trained("sft")
            config = replace(self.eval_config, systems=group)
            config = replace(config, generate=replace(config.generate, dtype=resolved_dtype(config.generate.dtype, config.device)))
            results = evaluate_systems(config, generations_path=str(path.with_suffix(".generations.jsonl")))
            return {**results, "versions": package_versions()}

        found = {}
        for path, group in groups:
            with contextlib.chdir(REPO):  # model paths in the configurations are the repository's
                data = self.exp.step(path, self.eval_expected(group), lambda g=group, p=path: compute(g, p),
                                     lambda d, g=group: self.eval_recorded(d, g))
            found.update({s: (path, data) for s in group})
        return found

    def first_match(self, candidates: list[Path], expected: dict, recorded) -> Path:
        """The first file whose record matches ``expected``; else the first candidate (computed there)."""
        for path in [p for p in candidates if p.is_file()]:
            differs = config_differences(expected, recorded(read_json(path)))
            if not differs:
                return path
            print(f"[{self.exp.name}] {path.relative_to(self.exp.results_root)}: configuration differs in {differs}", flush=True)
        return candidates[0]


# ---------------------------------------------------------------------------- the table
def plot_training(records: dict[str, dict], path: Path) -> Path | None:
    """Per logged step (one batch each, so noisy): -log Q(y|x) of the targets and log Q(y'|x) of the
    proposal samples, for the aligner and the direct fine-tune (from their training logs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.get("log") for r in records.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind, record in records.items():
        log, alpha = record.get("log") or [], record["config"]["loss"]["alpha"]
        steps = [row["step"] for row in log]
        for ax, key in zip(axes, ("nll", "sample_logp")):
            ax.plot(steps, [row[key] for row in log], marker="o", label=f"{kind} (α = {alpha:g})")
    for ax, title in zip(axes, ("targets: -log Q(y|x)", "proposal samples: log Q(y'|x)")):
        ax.set_xlabel("optimizer step (logged batch)")
        ax.set_title(title + ", summed per sequence", fontsize=10)
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    return path


def describe_setup(eval_config: dict, records: dict[str, dict]) -> str:
    """The setting, in words, from what the eval JSON and the training records state."""
    task, generate = eval_config["task"], eval_config["generate"]
    text = (f"Task `{task['data']}`, held-out `{task['split']}` split; documents cut to {task['max_document_tokens']} tokens; "
            f"{'greedy' if generate['greedy'] else 'sampled'} decoding of at most {generate['max_new_tokens']} new tokens in "
            f"{generate['dtype']}; proposal `{eval_config['proposal']}`.")
    aligner, sft = records.get("aligner", {}).get("config"), records.get("sft", {}).get("config")
    if aligner:
        text += (f"  Aligner: {'a LoRA (r ' + str(aligner['lora_r']) + ') copy' if aligner['lora'] else 'a full copy'} of "
                 f"`{aligner['aligner']}` trained with the {aligner['loss']['name']} loss (α = {aligner['loss']['alpha']:g}) on "
                 f"{aligner['n_examples']} training prompts (steps × prompts: {aligner['total_steps']} × {aligner['batch_size']}), "
                 f"lr {aligner['learning_rate']:g}, {aligner['dtype']} training.")
    if sft:
        text += (f"  Direct fine-tune (upper baseline): the same training with α = {sft['loss']['alpha']:g} "
                 f"({sft['total_steps']} × {sft['batch_size']}).")
    text += (f"  RAM modes share: proposal top-p {eval_config['decode']['proposal_top_p']:g}, aligner top-p "
             f"{eval_config['decode']['aligner_top_p']:g}, PAR-KL threshold {eval_config['decode']['kl_threshold']:g} nats, "
             f"SIR {eval_config['decode']['candidates']} candidates, EOS priority {eval_config['decode']['eos_priority']}.")
    return text


def training_records(pipeline: Pipeline) -> tuple[dict[str, dict], list[Path]]:
    """Each training's configuration and log, from the record that matches (this script's or the CLI run's)."""
    records, paths = {}, []
    for kind in pipeline.train_configs:
        path, data = pipeline.train_record(kind)
        if path is None:
            continue
        paths.append(path)
        if "step_config" in data:
            records[kind] = {"config": data["train_config"], "log": data["log"]}
        else:
            records[kind] = {"config": data, "log": read_log(path.with_name(f"{kind}_train_log.jsonl"))}
    return records, paths


def main(argv: list[str] | None = None) -> dict:
    def options(parser):
        parser.add_argument("--proposal", default="smollm2-135m-instruct", help="Proposal model P_M.")
        parser.add_argument("--aligner-init", default="smollm2-135m-instruct", help="Initial aligner (LoRA-trained copy).")
        parser.add_argument("--systems", default=",".join(SYSTEMS), help="Comma-separated systems to evaluate.")
        parser.add_argument("--alpha", type=float, default=1e-4, help="Weight of the proposal-sample term (RAM default).")
        parser.add_argument("--learning-rate", type=float, default=3e-4)
        parser.add_argument("--train-dtype", default="bf16", help="Training dtype (bf16 autocast, as published).")
        parser.add_argument("--dtype", default="fp32", help="Sampling and evaluation dtype (fp32, as published).")
        parser.add_argument("--device", default="cpu")

    exp, args = Experiment.start("ram_xsum", "RAM on the embedded XSum task: proposal, aligner, RAM modes, direct fine-tune", argv, options)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.quick:  # bf16 is emulated (~8x slower) on CPUs without bf16 units: quick trains in bf16 only where it is fast
        args.train_dtype = "auto"
    pipeline = Pipeline(exp, args, QUICK if args.quick else FULL)
    found = pipeline.evaluations()

    results = {s: found[s][1]["systems"][s] for s in args.systems}
    n_prompts = {found[s][1]["n_prompts"] for s in args.systems}
    best = {m: max(r[m] for r in results.values()) for m in ("rouge1", "rouge2", "rougeL")}
    decode = pipeline.eval_config.decode

    def label(system):
        if system in LABELS:
            return LABELS[system]
        return f"RAM `{system}`" + (f" (n = {decode.candidates})" if system == "sir" else "")

    def cell(system, metric):
        value = f"{results[system][metric]:.2f}"
        unique = sum(r[metric] == best[metric] for r in results.values()) == 1
        return f"**{value}**" if len(results) > 1 and unique and results[system][metric] == best[metric] else value

    rows = [[label(s), cell(s, "rouge1"), cell(s, "rouge2"), cell(s, "rougeL"), f"{r['mean_words']:.1f}",
             f"{r['finish_reasons']['eos']} / {found[s][1]['n_prompts']}"] for s, r in results.items()]
    markdown = markdown_table(["system", "ROUGE-1", "ROUGE-2", "ROUGE-L", "words", "ended by EOS"], rows, "lrrrrr")

    gaps = []
    if {"proposal", "aligner", "finetuned"} <= set(results):
        for mode in [m for m in RAM_MODES if m in results]:
            d = {other: results[mode]["rougeL"] - results[other]["rougeL"] for other in ("proposal", "aligner", "finetuned")}
            met = d["proposal"] > 0 and d["aligner"] > 0 and d["finetuned"] >= -TARGET_ROUGE_L_GAP_TO_FINETUNED
            gaps.append({"mode": mode, **d, "target_met": met})
        markdown += "\n\n" + markdown_table(
            ["RAM mode", "ROUGE-L − proposal", "− aligner alone", "− direct fine-tune",
             f"target: > 0, > 0, ≥ −{TARGET_ROUGE_L_GAP_TO_FINETUNED:g}"],
            [[f"`{g['mode']}`", f"{g['proposal']:+.2f}", f"{g['aligner']:+.2f}", f"{g['finetuned']:+.2f}",
              "met" if g["target_met"] else "missed"] for g in gaps], "lrrrl")

    records, train_paths = training_records(pipeline)
    notes = [describe_setup(found[args.systems[0]][1]["config"], records)]
    seconds = {s: r["seconds"] for s, r in results.items()}
    times = [f"decoding {'/'.join(map(str, sorted(n_prompts)))} prompts {min(seconds.values()):,.0f}-{max(seconds.values()):,.0f} s per system"]
    samples_path, samples = pipeline.sample_record()
    if samples:
        earlier = f" (the other {samples['already_done']:,} in an earlier run)" if samples.get("already_done") else ""
        times.insert(0, f"sampling {samples['sampled']:,} prompts {samples['seconds']:,.0f} s{earlier}")
    for kind, record in records.items():
        if record["log"]:
            name = "aligner" if kind == "aligner" else "direct fine-tune (SFT)"
            times.insert(len(times) - 1, f"{name} training {record['log'][-1]['seconds']:,.0f} s")
    notes.append("Wall time (as recorded): " + ", ".join(times) + ".")
    pngs = [p for p in [plot_training(records, exp.results / "training.png")] if p]
    sources = sorted({found[s][0] for s in args.systems}) + train_paths + ([samples_path] if samples_path else [])
    summary = {"systems": results, "n_prompts": sorted(n_prompts), "rouge_l_gaps": gaps,
               "targets": {"rougeL_gap_to_finetuned": TARGET_ROUGE_L_GAP_TO_FINETUNED},
               "eval_files": {s: str(found[s][0].relative_to(exp.results_root)) for s in args.systems},
               "config": pipeline.eval_expected(args.systems)}
    headline = []
    if "par" in results and {"proposal", "aligner", "finetuned"} <= set(results):
        headline.append((f"RAM `par` on XSum ({'/'.join(map(str, sorted(n_prompts)))} held-out prompts): "
                         "ROUGE-L vs proposal / aligner alone / direct fine-tune",
                         f"{results['par']['rougeL']:.2f} vs {results['proposal']['rougeL']:.2f} / "
                         f"{results['aligner']['rougeL']:.2f} / {results['finetuned']['rougeL']:.2f}"))
    exp.finish(summary, markdown, notes="\n\n".join(notes), pngs=pngs, sources=sources, headline=headline)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
