"""Two processes under ``accelerate launch`` (gloo, CPU) take the same steps as one process.

``amendlm debias`` and ``amendlm align train`` run on a tiny random Llama saved to a directory,
once in this process and once as ``accelerate launch --multi_gpu --num_processes 2`` (on a machine
without GPUs accelerate starts the processes with torchrun and each one finds only the CPU, so
they train together over gloo).  Both runs are given the same global batch (odd, so the two
processes get unequal shares); the dropout of the model and of LoRA is 0, so that nothing random
depends on how the batch is split (dropout masks are drawn per process and cannot match one
process's).  Checked: the logged losses, gradient norms and val scores agree, the saved adapter /
aligner weights agree, exactly one set of outputs and one log (no record twice) is written, the
summary line is printed once, and a checkpoint the two processes wrote resumes in one process to
the same weights as the one-process run's checkpoint.  Once with padded batches, once with
``--packing`` (each process packs its own share; the reference cache is filled from the gathered
global batch, so it is the same in both processes and in the checkpoint).

About 2 x 20 s of process start-up (torch and transformers imported twice per launch) on a
2-core CPU; marked ``integration`` (``make test`` runs it, ``make test-unit`` skips it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from amendlm.cli import app

from .conftest import make_byte_tokenizer, make_tiny_llama

pytestmark = pytest.mark.integration
LAUNCH_TIMEOUT_S = 600  # generous: a loaded machine starts two torch processes slowly
WORDS = [("kind", "rude", "fork"), ("smart", "dull", "blue")]


def _free_port() -> int:
    with socket.socket() as sock:  # other test runs on the machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m amendlm ARGS`` on the CPU (gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "amendlm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's amendlm in the launched processes
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_in_process(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("multiprocess"))


def write_files(root: Path) -> Path:
    """A tiny random Llama (no dropout) with a byte tokenizer, a toy StereoSet and a toy RAM task under ``root``."""
    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = []
    for bias_type in ("gender", "race"):
        for t in range(6):
            for k in range(2):
                s, a, u = WORDS[(t + k) % 2]
                target = f"{bias_type}{t}"
                rows.append({"type": "intrasentence", "target": target, "bias_type": bias_type,
                             "context": f"The {target} is BLANK.", "stereotype": f"The {target} is {s}.",
                             "anti-stereotype": f"The {target} is {a}.", "unrelated": f"The {target} is {u}."})
    (root / "stereoset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "unlearn.json").write_text(json.dumps({"stereoset": str(root / "stereoset.jsonl"), "lora_dropout": 0.0}))
    task = [{"id": i, "prompt": f"note {i}: rain today", "response": f"rain {i}"} for i in range(12)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task))
    samples = [{"id": str(i), "sample": f"sun {i} maybe", "finish_reason": "eos" if i % 2 else "length"} for i in range(12)]
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return root


def debias_args(files: Path, out: Path, max_steps: int = 2) -> list[str]:
    return ["debias", "--out", str(out), "--model", str(files / "model"), "--config", str(files / "unlearn.json"),
            "--max-steps", str(max_steps), "--batch-size", "3", "--lr", "1e-2", "--dtype", "fp32", "--kl-texts", "none",
            "--val-clusters", "0", "--checkpoint-every", "1", "--no-keep-best", "--no-progress", "--cpu"]


def align_args(files: Path, out: Path) -> list[str]:
    return ["align", "train", "--out", str(out), "--samples", str(files / "samples.jsonl"), "--proposal",
            str(files / "model"), "--init-from-proposal-layers", "1", "--data", str(files / "task.jsonl"),
            "--max-document-tokens", "0", "--max-steps", "2", "--batch-size", "3", "--save-every", "1",
            "--learning-rate", "1e-2", "--dtype", "fp32"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(first: Path, second: Path) -> None:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    for name in a:
        # atol: 1e-3 of the learning rate (AdamW's first steps move each weight by about lr, rounding included)
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_no_staging_left(out: Path) -> None:
    assert not [p.name for p in out.rglob(".*")], "a temporary directory or file was left behind"


@pytest.mark.parametrize("packing", [[], ["--packing"]], ids=["padded", "packed"])
def test_debias_on_two_processes_matches_one_process(files, tmp_path, packing):
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process(debias_args(files, one) + packing)
    printed = launch_two_processes(debias_args(files, two) + packing).stdout
    assert printed.count("completed after 2 steps") == 1  # the summary comes from the main process only

    log_one, log_two = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [(r.get("event"), r["step"]) for r in log_two] == [(r.get("event"), r["step"]) for r in log_one]
    assert [r.get("event") for r in log_one] == ["eval", None, None, "eval"]  # one record of each, none twice
    for a, b in zip(log_one, log_two):
        for key in ("loss", "forget", "retain", "kl", "grad_norm", "lr", "worst_gap"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        if a.get("event") == "eval":
            assert b["ss"] == pytest.approx(a["ss"], abs=1e-3) and b["lms"] == pytest.approx(a["lms"], abs=1e-3)
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # one adapter, one log, ...
    assert_no_staging_left(two)
    rng = torch.load(two / "checkpoint" / "rng.pt", weights_only=False)
    assert len(rng["processes"]) == 2  # each process's RNG state, for --resume

    for out in (one, two):  # the two-process checkpoint continues in one process as the one-process one does
        run_in_process(debias_args(files, out, max_steps=3) + packing + ["--resume"])
    assert_same_weights(one / "adapter_model.safetensors", two / "adapter_model.safetensors")


def test_align_train_on_two_processes_matches_one_process(files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process(align_args(files, one))
    printed = launch_two_processes(align_args(files, two)).stdout
    assert printed.count("trained 2 steps") == 1  # the summary line comes from the main process only

    log_one, log_two = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    events = [(r["event"], r["step"]) for r in log_one]
    assert [(r["event"], r["step"]) for r in log_two] == events == [("heldout", 0), ("train", 2), ("heldout", 2)]
    for a, b in zip(log_one, log_two):  # the train record's losses, and the held-out loss before and after
        for key in ("loss", "nll", "sample_logp", "lr"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert_same_weights(one / "aligner" / "model.safetensors", two / "aligner" / "model.safetensors")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    checkpoint = two / "checkpoints" / "step-000002"  # the newest only: written at the final step
    assert [p.name for p in (two / "checkpoints").iterdir()] == [checkpoint.name]
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert_no_staging_left(two)

    resumed = tmp_path / "resumed"  # the two processes' checkpoint, loaded in one process, gives the same aligner
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "aligner")
    (resumed / "train_summary.json").unlink()
    run_in_process(align_args(files, resumed))
    assert_same_weights(one / "aligner" / "model.safetensors", resumed / "aligner" / "model.safetensors")
