"""Unlearning step cost: batch shape, packed vs padded rows, reference model and dtype.

One run measures, each configuration in a fresh process (so peak memory is its own):

* seconds per BiasUnlearn optimizer step (forget + retain + KL batches, reference passes included),
  median over ``--steps`` after one warm-up step (and the fastest step), wall clock and CPU time of
  the process (all its threads; on a machine shared with other jobs the CPU time is the steadier);
* peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak RSS;
* achieved GFLOP/s and its fraction of the fp32 (or bf16) matmul peak measured at the start of
  the same run (:func:`benchlib.matmul_peak_gflops`), from two FLOP counts per step:

  - *nominal* (the column the first baselines were measured in; :func:`nominal_flops`):
    ``6 N T_policy + 2 N T_reference`` with ``N`` all parameters, ``T_policy`` the tokens of the
    examples drawn in the step and ``T_reference`` those of the streams with a reference pass
    (DESIGN.md §6), padding excluded and the same count whether the rows are packed or padded and
    whether a reference log-prob came from the cache, so the fraction of peak of a packed row is
    its speed-up times the padded row's: a speed figure, not a hardware counter;
  - *executed* (an estimate of the matmul work the passes really ran; :func:`executed_flops`)::

        policy:    (2 + 2) (B P_body + H P_head) + 6 L P_body
        reference:  2      (B R_body + H R_head)

    ``B`` the parameters of the transformer body (embedding tables, a lookup, and the LM head
    excluded), ``H`` those of the LM head (vocab x d_model, tied or not), ``L`` the LoRA
    parameters.  A policy position costs a forward (2 per parameter) and activation gradients
    (2) through the frozen base, which gets no weight gradients, plus forward, activation and
    weight gradients (6) through the adapters; a reference position a forward of the base.
    ``P_body`` / ``R_body`` are the positions the body ran in the policy / reference passes
    (padding included: a padded row computes it), ``P_head`` / ``R_head`` the positions the head
    ran on: all of them in padded rows, the scored ones only with packing
    (:meth:`amendlm.unlearn.forward.StepPasses.scored_logits`).  Reference log-probs served from
    the cache cost nothing (only the examples missing from it, and the ``kl`` stream, run the
    reference).  The positions are counted by forward hooks on the input embeddings and the head
    of every model (:class:`PassPositions`), so they are what ran, not a model of it; a pass counts
    as the reference's when it runs under ``no_grad``, else as the policy's (true of
    :mod:`amendlm.unlearn`'s step, see :class:`PassPositions` for what that assumes).  Left out,
    as in the nominal count: attention scores and values (``4 width d_model`` per position and
    layer; about 8 % at 256-token rows), norms, softmax, the optimizer; and the first layer's
    input projections need no activation gradient (under ``1 / layers`` of the body).

The configurations (:data:`CONFIGS`): the default recipe's BiasUnlearn at 8 / 8 / 8 examples per
stream (``--batch-size``) and the ``official`` recipe's 4 / 28 / 28, each padded
(``packing=False``) and packed (``packing=True``: :mod:`amendlm.unlearn.forward`); the second
frozen copy as reference, and bf16 autocast.  bf16 is measured only where a quick matmul probe
shows it is not much slower than fp32 (on CPUs without bf16 units it is emulated and ~8x slower);
otherwise the row says why it was skipped.

Usage: ``python benchmarks/bench_unlearn.py [--steps 3] [--batch-size 8] [--out results/bench_unlearn.json]``;
from Python, :func:`measure` takes the same options and returns the results.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from typing import Sequence

import torch

from benchlib import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)

POSITION_KINDS = ("policy_body", "policy_head", "reference_body", "reference_head")


def nominal_flops(params: int, policy_tokens: float, reference_tokens: float) -> float:
    """Nominal FLOPs of one step, ``6 N T_policy + 2 N T_reference`` (see the module docstring).

    Args:
        params: ``N``, every parameter of the model (LoRA excluded).
        policy_tokens: tokens of the examples drawn in the step, padding excluded.
        reference_tokens: tokens of the examples of the streams with a reference pass.
    """
    return 6 * params * policy_tokens + 2 * params * reference_tokens


def executed_flops(body_params: int, head_params: int, lora_params: int, policy_body: float, policy_head: float,
                   reference_body: float, reference_head: float, base_trained: bool = False) -> float:
    """Estimated matmul FLOPs one step ran (see the module docstring for what is left out):
    ``4 (B P_body + H P_head) + 6 L P_body + 2 (B R_body + H R_head)``.

    Args:
        body_params: ``B``, parameters of the transformer body (no embedding table, no LM head).
        head_params: ``H``, the LM head's weight (vocab x d_model; counted even when tied to the
            embedding: the head is a matmul, the embedding a lookup).
        lora_params: ``L``, the adapters' parameters (0 without LoRA).
        policy_body, policy_head: positions the body / the head ran on in the policy passes.
        reference_body, reference_head: the same for the reference passes (0 for cached log-probs).
        base_trained: full fine-tuning: the base also gets weight gradients (2 more per parameter
            and policy position).

    Returns:
        FLOPs (a multiply-add is 2).
    """
    base = body_params * policy_body + head_params * policy_head
    return ((6 if base_trained else 4) * base + 6 * lora_params * policy_body
            + 2 * (body_params * reference_body + head_params * reference_head))


def parameter_split(model) -> dict[str, int]:
    """``{"body", "head", "lora"}`` parameter counts of ``model`` (a causal LM, PEFT-wrapped or not) for
    :func:`executed_flops`: the LoRA parameters (names containing ``lora_``), the LM head's weight,
    and the rest without the embedding tables (``nn.Embedding`` weights: lookups, no matmul)."""
    head = model.get_output_embeddings()
    lookups = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    skipped = lookups | {id(head.weight)}
    body = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and id(p) not in skipped)
    return {"body": body, "head": head.weight.numel(), "lora": lora}


class PassPositions:
    """Positions the model passes of each step run, counted by forward hooks.

    The input embeddings of each model count the body's positions (``input_ids.numel()``,
    padding included), the output head those it runs on (its output's leading dimensions, after
    :meth:`~amendlm.unlearn.forward.StepPasses.scored_logits` narrowed it to the scored positions);
    a pass under ``no_grad`` is a reference pass, else a policy pass.  :meth:`step` starts a step.

    The label comes from ``torch.is_grad_enabled()`` alone, which assumes that every policy pass
    runs with gradients on and every reference pass under ``no_grad`` (as in
    :meth:`amendlm.unlearn.trainer.UnlearnTrainer.train_step`: the reference in
    :func:`amendlm.unlearn.models.reference_logits`, and no evaluation inside a measured step).
    A policy pass under ``no_grad`` would be counted as a reference pass, and gradient
    checkpointing that re-runs the embeddings in the backward pass would count its positions a
    second time (the step uses no gradient checkpointing); either would make the executed FLOPs wrong.

    Args:
        models: the policy (unwrapped) and, with ``reference="copy"``, the frozen copy.
    """

    def __init__(self, models):
        self.steps: list[dict[str, int]] = []
        self.handles = []
        for model in models:
            self.handles.append(model.get_input_embeddings().register_forward_hook(self._counter("body")))
            self.handles.append(model.get_output_embeddings().register_forward_hook(self._counter("head")))

    def _counter(self, part: str):
        def count(module, args, output):
            if self.steps:
                kind = "policy" if torch.is_grad_enabled() else "reference"
                self.steps[-1][f"{kind}_{part}"] += output.shape[:-1].numel()
        return count

    def step(self) -> None:
        """Count what follows as a new step."""
        self.steps.append(dict.fromkeys(POSITION_KINDS, 0))

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


# (recipe, packing, reference, dtype); the default recipe runs --batch-size per stream, official 4 / 28 / 28
CONFIGS = [
    ("default", False, "adapter", "fp32"), ("default", True, "adapter", "fp32"),
    ("official", False, "adapter", "fp32"), ("official", True, "adapter", "fp32"),
    ("default", False, "copy", "fp32"), ("default", False, "adapter", "bf16"), ("official", True, "adapter", "bf16"),
]
BASELINE = ("default", False, "adapter", "fp32")  # the row every ratio is taken against


def config_label(recipe: str, packing: bool, reference: str, dtype: str) -> str:
    """A configuration as a short stable name, e.g. ``official/packed/adapter/fp32``."""
    return f"{recipe}/{'packed' if packing else 'padded'}/{reference}/{dtype}"


def _measure(spec: tuple, model_name: str, steps: int, batch_size: int, queue) -> None:
    from amendlm.data.stereoset import load_stereoset
    from amendlm.data.text import load_texts
    from amendlm.modeling import load_model
    from amendlm.unlearn.artifacts import StepLog
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.packing import pack_examples
    from amendlm.unlearn.trainer import UnlearnTrainer

    recipe, packing, reference, dtype = spec
    with tempfile.TemporaryDirectory() as out:
        options = {"model": model_name, "reference": reference, "dtype": dtype, "packing": packing,
                   "max_steps": steps + 1, "kl_text_limit": 50}
        if recipe == "default":
            options["batch_size"] = batch_size
        config = UnlearnConfig.from_recipe(recipe, out, options)
        model, tokenizer = load_model(model_name)
        n_params = sum(p.numel() for p in model.parameters())
        texts = load_texts("xsum-sample", "document")[:50] if config.kl_texts else []
        trainer = UnlearnTrainer(config, model, tokenizer, load_stereoset(), texts)
        log = StepLog(trainer.out / "log.jsonl")
        cuda = trainer.accelerator.device.type == "cuda"
        drawn, next_batches = [], trainer._next_batches

        def recording():  # the examples each step draws, for the FLOP count
            batches = next_batches()
            drawn.append(batches)
            return batches

        trainer._next_batches = recording
        policy = trainer.accelerator.unwrap_model(trainer.model)
        split = parameter_split(policy)
        positions = PassPositions([policy] + ([trainer.reference_model] if trainer.reference_model is not None else []))
        seconds, cpu_seconds = [], []
        for index in range(steps + 1):
            positions.step()
            began, began_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(log)
            if cuda:
                torch.cuda.synchronize()
            if index:  # the first step warms up allocators and kernels
                seconds.append(time.perf_counter() - began)
                cpu_seconds.append(time.process_time() - began_cpu)
        positions.close()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = drawn[1:]
    reference_streams = trainer.method.reference_streams
    policy_tokens = statistics.mean(sum(len(e.ids) for b in batches.values() for e in b) for batches in timed)
    reference_tokens = statistics.mean(sum(len(e.ids) for name in reference_streams for e in batches[name])
                                       for batches in timed)
    padded_tokens = statistics.mean(sum(len(b) * max(len(e.ids) for e in b) for b in batches.values()) for batches in timed)
    packed_tokens = statistics.mean(
        pack_examples([e for b in batches.values() for e in b], 0).inputs["input_ids"].numel() for batches in timed)
    flops = nominal_flops(n_params, policy_tokens, reference_tokens)
    ran = {kind: statistics.mean(counts[kind] for counts in positions.steps[1:]) for kind in POSITION_KINDS}
    executed = executed_flops(split["body"], split["head"], split["lora"], **ran, base_trained=config.finetune == "full")
    step = statistics.median(seconds)
    cache = trainer.passes.cache
    queue.put({"recipe": recipe, "packing": packing, "reference": reference, "dtype": dtype,
               "label": config_label(*spec), "batch_sizes": {name: config.stream_batch_size(name) for name in trainer.method.streams},
               "seconds_per_step": step, "best_seconds_per_step": min(seconds),
               "cpu_seconds_per_step": statistics.median(cpu_seconds), "peak_memory_mib": peak,
               "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss", "gflops_per_s": flops / step / 1e9,
               "nominal_flops_per_step": flops, "executed_flops_per_step": executed,
               "executed_gflops_per_s": executed / step / 1e9, "parameter_split": split, "positions_per_step": ran,
               "params": n_params, "policy_tokens_per_step": policy_tokens, "reference_tokens_per_step": reference_tokens,
               "padded_tokens_per_step": padded_tokens, "packed_tokens_per_step": packed_tokens,
               "packing_fallback": trainer.passes.fallback,
               "reference_cache_hit_rate": cache.hits / cache.lookups if cache is not None and cache.lookups else None})


def run(spec: tuple, model_name: str, steps: int, batch_size: int) -> dict:
    """Measure one configuration (:data:`CONFIGS` entry) in a fresh (spawned) process."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(spec, model_name, steps, batch_size, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def measure(model_name: str = "smollm2-135m-instruct", steps: int = 3, batch_size: int = 8,
            configs: Sequence[str] | None = None) -> dict:
    """Run the benchmark (options as the CLI's; each configuration in a fresh process) and return the results.

    ``configs``: labels (:func:`config_label`) of the :data:`CONFIGS` to run (default: all; the
    :data:`BASELINE` always runs).

    Raises:
        ValueError: an unknown label in ``configs`` (lists the valid ones).

    Returns:
        ``{"options", "matmul_gflops": {"fp32", "bf16"}, "batch_size", "steps", "torch_threads",
        "rows": [...], "versions"}``; each row has ``seconds_per_step``, ``gflops_per_s`` and
        ``fraction_of_matmul_peak`` (nominal FLOPs), ``executed_gflops_per_s`` and
        ``executed_fraction_of_matmul_peak`` (executed FLOPs, from ``positions_per_step`` and ``parameter_split``),
        ``time_vs_baseline`` (against :data:`BASELINE`), ``speedup_vs_padded`` (packed rows:
        against the padded row of the same recipe, reference and dtype), or ``skipped`` with the reason.
    """
    from amendlm.report import package_versions

    labels = [config_label(*c) for c in CONFIGS]
    unknown = sorted(set(configs or ()) - set(labels))
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; valid: {', '.join(labels)}")
    chosen = [c for c in CONFIGS if configs is None or c == BASELINE or config_label(*c) in configs]
    options = {"model": model_name, "steps": steps, "batch_size": batch_size, "configs": [config_label(*c) for c in chosen]}
    fp32, bf16 = matmul_peak_gflops(torch.float32), matmul_peak_gflops(torch.bfloat16)
    rows = []
    for spec in chosen:
        if spec[3] == "bf16" and not torch.cuda.is_available() and bf16 < 0.5 * fp32:
            rows.append({"recipe": spec[0], "packing": spec[1], "reference": spec[2], "dtype": spec[3], "label": config_label(*spec),
                         "skipped": f"bf16 matmul {bf16:.1f} GFLOP/s vs fp32 {fp32:.1f}: emulated here"})
            continue
        rows.append(run(spec, model_name, steps, batch_size))
        print(f"{rows[-1]['label']}: {rows[-1]['seconds_per_step']:.2f} s/step", flush=True)
    by_label = {row["label"]: row for row in rows}
    base = by_label[config_label(*BASELINE)]
    for row in rows:
        if "seconds_per_step" not in row:
            continue
        row["time_vs_baseline"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["memory_vs_baseline"] = row["peak_memory_mib"] / base["peak_memory_mib"]
        peak = bf16 if row["dtype"] == "bf16" else fp32
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak  # nominal FLOPs
        row["executed_fraction_of_matmul_peak"] = row["executed_gflops_per_s"] / peak
        padded = by_label.get(config_label(row["recipe"], False, row["reference"], row["dtype"]), {})
        if row["packing"] and "seconds_per_step" in padded:
            row["speedup_vs_padded"] = padded["seconds_per_step"] / row["seconds_per_step"]
    print(f"matmul peak: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s; {torch.get_num_threads()} threads")
    print(f"{'configuration':<32} {'batches':<9} {'s/step':>7} {'x time':>7} {'peak MiB':>9} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'exec GFLOP/s':>13} {'% peak':>7}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['label']:<32} skipped: {row['skipped']}")
            continue
        shape = "/".join(str(v) for v in row["batch_sizes"].values())
        print(f"{row['label']:<32} {shape:<9} {row['seconds_per_step']:7.2f} {row['time_vs_baseline']:7.2f} "
              f"{row['peak_memory_mib']:9.0f} {row['gflops_per_s']:8.1f} {100 * row['fraction_of_matmul_peak']:6.0f} % "
              f"{row['executed_gflops_per_s']:13.1f} {100 * row['executed_fraction_of_matmul_peak']:6.0f} %")
    return {"options": options, "matmul_gflops": {"fp32": fp32, "bf16": bf16}, "batch_size": batch_size,
            "steps": steps, "torch_threads": torch.get_num_threads(), "rows": rows, "versions": package_versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", default=None, help="comma list of configurations to run (default: all): "
                        + ", ".join(config_label(*c) for c in CONFIGS))
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    results = measure(args.model, args.steps, args.batch_size, args.configs.split(",") if args.configs else None)
    if args.out:
        from amendlm.report import atomic_write_json

        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
