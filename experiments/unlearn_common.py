"""What the BiasUnlearn tables share (``unlearn_methods.py``, ``transfer.py``): runs, variant, evaluations.

Both tables need the 50-step BiasUnlearn adapter of the embedded model, so its configuration, and
how a training run or the fine-tuned variant becomes part of a resumable step, live here once.

Paths, relative to the repository (or under ``--results-dir DIR``, ``runs/`` included)::

    runs/unlearn/<run>/                   a training run: adapter, checkpoint (runs/ is not in git)
    results/unlearn/runs/<run>/           its record: unlearn_config.json, summary.json, log.jsonl, ss_per_type.png
    results/unlearn/<run>_test.json       the adapter evaluated on the test targets
    runs/variant/                         the fine-tuned variant (transfer)
    results/unlearn/variant_summary.json  its record

The rows already measured were made in bf16 and their names carry no dtype; another dtype adds
``_<dtype>`` to every name (``dpo_s50_fp32_test.json``; the base model: ``base_test_<dtype>.json``, as
recorded), so a result never replaces one of another dtype.

**Lazy.**  An evaluation is reused when its file records the expected evaluation settings *and*
the record of what it evaluates (``training.*``: the run's ``unlearn_config.json`` under
``results/``; ``variant.*``: the variant's ``summary.json``) equals the expected configuration.
Only an evaluation that must be computed needs the adapter or the variant on disk; only then is a
run trained (resumed from its checkpoint when it has one) or the variant fine-tuned.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from amendlm.report import atomic_save_figure, atomic_write_json
from common import REPO, RESULTS, Experiment, config_differences, eval_defaults, eval_expected, eval_recorded, read_json
from eval_common import current_recipe_name as _current_recipe_name  # noqa: F401
from eval_common import prefixed as _prefixed, training_record as _training_record  # noqa: F401

BASE_MODEL = "smollm2-135m-instruct"  # amendlm.resources.DEFAULT_MODEL, the model of every recorded row

# --quick: the same pipeline on a tiny budget (about a minute on 2 cores)
QUICK_UNLEARN = {"max_steps": 1, "batch_size": 2, "val_clusters": 4, "kl_text_limit": 2,
                 "keep_best": False}  # step 0 may be "best" on 4 val clusters: an all-zero adapter
QUICK_FINETUNE = {"max_steps": 1, "batch_size": 2, "chunk_tokens": 32, "limit": 8}
QUICK_EVAL_LIMIT = 6  # examples per benchmark

RECORD_FILES = ("unlearn_config.json", "summary.json", "log.jsonl", "ss_per_type.png")
# what finetune_variant's summary.json records of the variant's configuration (see variant_expected)
VARIANT_KEYS = ("steps", "sequences_per_step", "tokens_per_step", "dtype", "texts", "texts_sha256")


@dataclass(frozen=True)
class Run:
    """One unlearning run of a table.

    Attributes:
        stem: the run's name without its budget; the run is ``<stem>_s<max_steps>`` (+ ``_<dtype>``
            unless bf16), e.g. ``dpo_s50``.
        options: :class:`UnlearnConfig` options besides ``out``, ``model`` and ``dtype``
            (``max_steps`` required); ``--quick`` overrides them with :data:`QUICK_UNLEARN`.
    """

    stem: str
    options: dict = field(default_factory=dict)


# `amendlm debias --method biasunlearn --out runs/unlearn/biasunlearn_s50 --dtype bf16 --max-steps 50` (README)
BIASUNLEARN_50 = Run("biasunlearn", {"method": "biasunlearn", "max_steps": 50})


def pairwise_run() -> Run:
    """The default recipe of ``amendlm debias`` (``pairwise``, 100 steps): the very run of
    ``unlearn_ablation.py``'s ``dpo-swap-rest`` row (``ablation_dpo-swap-rest_s100``), shared with it.  Its
    ``UnlearnConfig`` holds the recipe's fields under the label ``recipe="biasunlearn"`` (recorded as
    ``"default"``, its former name; the row was trained through the Python API); a test keeps the
    recipe and the row equal."""
    from amendlm.unlearn.recipes import recipe_fields

    return Run("ablation_dpo-swap-rest", {"method": "biasunlearn", **recipe_fields("pairwise")})


def dtype_tag(dtype: str) -> str:
    """``""`` for bf16 (the recorded rows' names), else ``"_<dtype>"``."""
    return "" if dtype == "bf16" else f"_{dtype}"


def runs_root(exp: Experiment) -> str:
    """``runs`` (relative to the repository, as the recorded configs name it) or ``DIR/runs``."""
    return "runs" if exp.results_root == RESULTS.resolve() else str(exp.results_root / "runs")


def enter_repo(exp: Experiment) -> None:
    """Work from the repository root when runs are named relative to it (``runs/unlearn/...``)."""
    if runs_root(exp) == "runs" and Path.cwd().resolve() != REPO:
        exp.docs = exp.docs.resolve()
        os.chdir(REPO)


def eval_options(exp: Experiment, dtype: str) -> dict:
    """The :class:`EvalConfig` options of every row: test targets, all data (``--quick``: 6 examples)."""
    return {"split": "test", "dtype": dtype, **({"limit": QUICK_EVAL_LIMIT} if exp.quick else {})}


def unlearn_config(exp: Experiment, run: Run, dtype: str, model: str = BASE_MODEL):
    """``(name, UnlearnConfig)`` of ``run`` on ``model`` for this experiment's budget and dtype."""
    from amendlm.unlearn.config import UnlearnConfig

    options = {**run.options, **(QUICK_UNLEARN if exp.quick else {})}
    name = f"{run.stem}_s{options['max_steps']}{dtype_tag(dtype)}"
    return name, UnlearnConfig(out=f"{runs_root(exp)}/unlearn/{name}", model=model, dtype=dtype, **options)


def variant_config(exp: Experiment, dtype: str):
    """``FinetuneConfig`` of the variant: README's ``amendlm finetune --out runs/variant --dtype bf16 --max-steps 60``."""
    from amendlm.finetune import FinetuneConfig

    options = {"max_steps": 60, **(QUICK_FINETUNE if exp.quick else {})}
    return FinetuneConfig(out=f"{runs_root(exp)}/variant{dtype_tag(dtype)}", model=BASE_MODEL, dtype=dtype, **options)


def records(exp: Experiment, name: str) -> Path:
    """``results/unlearn/runs/<name>``: the copy of a run's config, summary and log kept in git."""
    return exp.path(f"unlearn/runs/{name}")


def eval_log(records_dir: Path) -> list[dict]:
    """The ``eval`` records of a run's ``log.jsonl``: val SS / LMS per bias type at a step."""
    from amendlm.unlearn.artifacts import read_log

    return [r for r in read_log(records_dir / "log.jsonl") if r.get("event") == "eval"]


# ---------------------------------------------------------------------------- training
def _finished(run_dir: Path) -> bool:
    """The run saved its weights and was not interrupted."""
    status = read_json(run_dir / "summary.json").get("status")
    return (run_dir / "adapter_model.safetensors").is_file() and status in ("completed", "stopped")


def _has_checkpoint(run_dir: Path) -> bool:
    """A complete checkpoint, or its ``.old`` twin after a crash (what ``train(resume=True)`` resumes)."""
    return any((run_dir / name / "state.json").is_file() for name in ("checkpoint", "checkpoint.old"))


def ensure_adapter(exp: Experiment, name: str, config) -> None:
    """The adapter of ``config`` on disk, and its record in ``results/unlearn/runs/<name>``.

    A finished run with the same configuration is kept; else the run is trained, resumed from its
    checkpoint when it has one (``train`` refuses a directory holding a different configuration).
    """
    from amendlm.unlearn.trainer import train

    run_dir, record_dir = Path(config.out), records(exp, name)
    have = _training_record(read_json(run_dir / "unlearn_config.json")) if _finished(run_dir) else {}
    trained = bool(config_differences(config.to_dict(), have))
    if trained:
        resume = _has_checkpoint(run_dir)
        print(f"[{exp.name}] {run_dir}: {'resuming' if resume else 'training'} ({config.method}, "
              f"{config.max_steps} steps, {config.dtype})", flush=True)
        began = time.perf_counter()
        result = train(config, resume=resume)
        seconds = time.perf_counter() - began
        if result.status not in ("completed", "stopped"):  # interrupted or NaN: never evaluate or record it
            raise SystemExit(f"[{exp.name}] {run_dir}: training ended '{result.status}' at step {result.steps}; "
                             "nothing recorded; run the script again to resume")
        exp.steps_done += 1
    if not trained and read_json(record_dir / "unlearn_config.json") == read_json(run_dir / "unlearn_config.json") \
            and (record_dir / "summary.json").is_file():
        return  # the record is this run's already (and may hold the provenance of its training)
    record_dir.mkdir(parents=True, exist_ok=True)
    for file in RECORD_FILES:
        if (run_dir / file).is_file():
            shutil.copy2(run_dir / file, record_dir / file)
    if trained:  # the machine and date of the training, for the results page
        summary = read_json(record_dir / "summary.json")
        summary["provenance"] = exp.provenance(seconds)
        atomic_write_json(record_dir / "summary.json", summary)


# ---------------------------------------------------------------------------- the variant
def variant_expected(config) -> dict:
    """What the variant's ``summary.json`` records of its configuration, as :func:`finetune_variant` writes it.

    Steps, global batch (one device), tokens per step, resolved dtype, and the number and SHA-256
    of the texts.  ``model``, ``lr``, ``seed`` and ``text_field`` are not in that file (the recorded
    variant has no other record in git), so they are not compared: they are FinetuneConfig's
    defaults, which these scripts do not change.
    """
    from amendlm.finetune import read_texts
    from amendlm.resources import file_sha256

    path, texts = read_texts(config.texts, field=config.text_field, limit=config.limit)
    return {"steps": config.max_steps, "sequences_per_step": config.batch_size,
            "tokens_per_step": config.batch_size * config.chunk_tokens, "dtype": config.dtype,
            "texts": len(texts), "texts_sha256": file_sha256(path)}


def variant_recorded(summary: dict) -> dict:
    """The :func:`variant_expected` fields of a variant ``summary.json``."""
    return {k: summary[k] for k in VARIANT_KEYS if k in summary}


def variant_record(exp: Experiment, config) -> Path:
    """``results/unlearn/variant_summary.json`` (``variant_<dtype>_summary.json`` unless bf16)."""
    return exp.path(f"unlearn/variant{dtype_tag(config.dtype)}_summary.json")


def ensure_variant(exp: Experiment, config) -> None:
    """The variant on disk (fine-tuned unless a matching one is there) and its record in results/."""
    from amendlm.finetune import finetune_variant

    run_dir, expected = Path(config.out), variant_expected(config)
    summary = read_json(run_dir / "summary.json")
    on_disk = (run_dir / "model.safetensors").is_file()
    differs = config_differences(expected, variant_recorded(summary)) if on_disk else ["model.safetensors"]
    path = variant_record(exp, config)
    recorded = {k: v for k, v in read_json(path).items() if k not in ("finetune_config", "provenance")}
    if not differs and recorded == summary:
        return  # the record is this variant's already (and may hold the provenance of its fine-tuning)
    seconds = None
    if differs:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise FileExistsError(f"{run_dir} holds another variant (differs in {differs}); move it away to make this one")
        print(f"[{exp.name}] {run_dir}: fine-tuning the variant ({config.max_steps} steps, {config.dtype})", flush=True)
        began = time.perf_counter()
        finetune_variant(config)
        seconds = time.perf_counter() - began
        exp.steps_done += 1
        summary = read_json(run_dir / "summary.json")
    record = {**summary, "finetune_config": read_json(run_dir / "finetune_config.json")}
    if seconds is not None:
        record["provenance"] = exp.provenance(seconds)
    atomic_write_json(path, record)


# ---------------------------------------------------------------------------- evaluation
class KeptBaseModel(Exception):
    """A run whose selection kept its step-0 weights (an all-zero LoRA update: the base model itself).

    Such an adapter is refused by :func:`amendlm.modeling.load_model`; a table shows the row as
    "kept step 0" with the base model's numbers instead of evaluating it.
    """

def eval_step(exp: Experiment, path: Path, model: str, dtype: str, adapter: tuple[str, object] | None = None,
              variant=None) -> dict:
    """One row's evaluation as a resumable step (see the module docstring: lazy training).

    Args:
        path: the eval JSON (``results/unlearn/<run>_test.json``).
        model: the evaluated model (the base name, or the variant's directory).
        adapter: ``(name, UnlearnConfig)`` of the adapter run evaluated on ``model``, or None.
        variant: the ``FinetuneConfig`` that makes ``model``, when ``model`` is the variant.

    Returns:
        The eval JSON (:func:`amendlm.bias.evaluate.evaluate_model`'s dict).
    """
    from amendlm.bias.evaluate import EvalConfig, evaluate_model

    config = EvalConfig(**{"progress": False, **eval_options(exp, dtype)})
    expected = eval_expected(model, adapter[1].out if adapter else None, config)
    if adapter:
        expected.update(_prefixed("training", adapter[1].to_dict()))
    if variant is not None:
        expected.update(_prefixed("variant", variant_expected(variant)))

    def recorded(data: dict) -> dict:
        if "step_config" in data:  # made by a script: it records what it evaluated (training.* / variant.*)
            return _current_recipe_name(data["step_config"])
        have = eval_recorded(data)  # a CLI-made file: its adapter's record sits under results/unlearn/runs
        if adapter:
            have.update(_prefixed("training", _training_record(read_json(records(exp, adapter[0]) / "unlearn_config.json"))))
        if variant is not None:
            have.update(_prefixed("variant", variant_recorded(read_json(variant_record(exp, variant)))))
        return have

    def compute() -> dict:
        if variant is not None:
            ensure_variant(exp, variant)
        if adapter:
            ensure_adapter(exp, *adapter)
            kept = read_json(records(exp, adapter[0]) / "summary.json").get("weights_saved", "")
            if kept == "best (step 0)":  # the selection kept the untouched model: its evaluation is the base model's
                base = read_json(exp.path(f"unlearn/base_test_{expected['dtype']}.json"))
                if model == BASE_MODEL and base:
                    return {**{k: v for k, v in base.items() if k not in ("step_config", "provenance")},
                            "kept_base_model": True, "adapter": None}
                raise KeptBaseModel(f"{adapter[0]}: its selection kept step 0, i.e. the base model")
        return evaluate_model(model, replace(config, dtype=expected["dtype"]), adapter=adapter[1].out if adapter else None)

    from amendlm.unlearn.config import FIELDS_ADDED

    # a field added to UnlearnConfig after a step was recorded counts as the value it had when added
    return exp.step(path, expected, compute, recorded=recorded, defaults={**eval_defaults(), **_prefixed("training", FIELDS_ADDED)})


def base_eval(exp: Experiment, dtype: str) -> tuple[Path, dict]:
    """The embedded model before unlearning, on the test targets: ``results/unlearn/base_test_<dtype>.json``."""
    from common import run_eval

    path = exp.path(f"unlearn/base_test_{dtype}.json")
    return path, run_eval(exp, path, BASE_MODEL, **eval_options(exp, dtype))


# ---------------------------------------------------------------------------- tables
def target_checks(before: dict, after: dict, before_name: str, after_name: str) -> list[dict]:
    """:func:`amendlm.bias.compare.check_targets` as plain dicts (name, passed, value, bound, detail)."""
    from amendlm.bias.compare import check_targets

    return [asdict(check) for check in check_targets(before, after, before_name, after_name)]


def targets_table(checks: dict[str, list[dict]]) -> str:
    """Markdown: one row per run, one column per target, cells ``met (value)`` / ``missed (value)`` / ``n/a``."""
    from amendlm.bias.compare import TARGET_NAMES

    def cell(check: dict) -> str:
        verdict = {True: "met", False: "**missed**", None: "n/a"}[check["passed"]]
        return verdict if check["value"] is None else f"{verdict} ({check['value']:.2f})"

    lines = ["| run | " + " | ".join(TARGET_NAMES) + " |", "|:---|" + "---:|" * len(TARGET_NAMES)]
    lines += [f"| {label} | " + " | ".join(cell(c) for c in row) + " |" for label, row in checks.items()]
    return "\n".join(lines) + "\n"


def describe_test_set(data: dict) -> str:
    """E.g. ``846 StereoSet test clusters of 16 target terms (gender 2 / 86, ...), 1508 CrowS-Pairs pairs``."""
    groups = data["benchmarks"]["stereoset"]["scores"]["overall"]
    overall = groups["overall"]
    types = ", ".join(f"{t} {g['n_targets']} / {g['n_clusters']}" for t, g in sorted(groups.items()) if t != "overall")
    crows = data["benchmarks"].get("crows-pairs", {}).get("scores", {}).get("overall", {})
    ppl = data["benchmarks"].get("perplexity", {})
    return (f"{overall['n_clusters']} StereoSet {data['benchmarks']['stereoset'].get('split', '')} clusters of "
            f"{overall['n_targets']} target terms (terms / clusters: {types}); {crows.get('n_pairs', 'n/a')} CrowS-Pairs "
            f"pairs; perplexity over {ppl.get('n_tokens', 'n/a')} WikiText tokens")


def pareto_figure(path: Path, points: dict[str, dict], val: dict[str, list[dict]], kept: dict[str, int | None],
                  val_clusters: dict[str, int | None]) -> None:
    """Three panels: test SS vs test LMS, test SS vs perplexity (one point per run), val SS vs val LMS over training."""
    import matplotlib

    from amendlm.bias.compare import SS_TOLERANCE

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = {name: ("black" if i == 0 else plt.cm.tab10((i - 1) % 10)) for i, name in enumerate(points)}
    for ax, key, ylabel in ((axes[0], "lms", "test LMS (ideal 100)"), (axes[1], "ppl", "WikiText perplexity (lower is better)")):
        for name, row in points.items():
            if row["ss"] is None or row[key] is None:
                continue
            ax.scatter(row["ss"], row[key], color=colours[name], s=40, marker="s" if name == next(iter(points)) else "o",
                       label=name, zorder=3)
        ax.set_xlabel("test SS (ideal 50)")
        ax.set_ylabel(ylabel)
    axes[0].set_title("test targets: SS vs LMS")
    axes[1].set_title("test targets: SS vs perplexity")
    for name, records_ in val.items():
        if not records_:
            continue
        ss = [r["ss"]["overall"] for r in records_]
        lms = [r["lms"]["overall"] for r in records_]
        axes[2].plot(ss, lms, marker="o", ms=3, lw=1.2, color=colours[name], label=name)
        axes[2].scatter(ss[0], lms[0], color=colours[name], marker="x", s=40, zorder=3)
        best = [(s, l) for r, s, l in zip(records_, ss, lms) if r["step"] == kept.get(name)]
        if best:
            axes[2].scatter(*best[-1], color=colours[name], marker="*", s=140, zorder=4, edgecolor="black", linewidths=0.5)
    clusters = sorted({c for c in val_clusters.values() if c})
    axes[2].set_title(f"VAL targets during training ({'/'.join(map(str, clusters)) or '?'} clusters)\nx = step 0, * = kept step")
    axes[2].set_xlabel("val SS (in-training evaluation)")
    axes[2].set_ylabel("val LMS (in-training evaluation)")
    base = next(iter(points.values()))
    if base.get("lms") is not None:  # the LMS target: at most 2 points below the base model
        axes[0].axhline(base["lms"] - 2, color="0.4", ls="--", lw=0.8, label="LMS target (base − 2)")
    first_val = next((r for records_ in val.values() for r in records_[:1]), None)
    if first_val is not None:
        axes[2].axhline(first_val["lms"]["overall"] - 2, color="0.4", ls="--", lw=0.8, label="val LMS at step 0 − 2")
    for ax in axes:
        ax.axvspan(50 - SS_TOLERANCE, 50 + SS_TOLERANCE, color="0.92", zorder=0)  # the overall-SS target band
        ax.axvline(50, color="0.5", lw=0.8, zorder=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    axes[2].legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=100)
