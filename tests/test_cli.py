"""CLI input errors: one clear line, exit code 1, before any model is loaded."""

import json

import pytest
from typer.testing import CliRunner

from amendlm.cli import app


def test_bad_data_fails_fast_with_file_row_and_field(tmp_path, monkeypatch):
    import amendlm.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the data is bad")

    monkeypatch.setattr(amendlm.modeling, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "intrasentence", "target": "x"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--stereoset", str(bad), "--benchmarks", "stereoset"])
    assert result.exit_code == 1
    assert f"error: {bad} row 1: missing field" in result.output
    assert "Traceback" not in result.output

    missing = CliRunner().invoke(app, ["eval", "--crows-pairs", str(tmp_path / "nope.csv"), "--benchmarks", "crows-pairs"])
    assert missing.exit_code == 1 and "nope.csv' is neither an embedded dataset" in missing.output


def test_unknown_benchmark_is_a_usage_error():
    result = CliRunner().invoke(app, ["eval", "--benchmarks", "stereoset,glue"])
    assert result.exit_code == 2 and "unknown benchmark" in result.output


def test_eval_of_an_adapter_on_all_targets_warns_that_training_targets_are_included(tmp_path, monkeypatch):
    import amendlm.bias.evaluate

    def stop(*args, **kwargs):
        raise ValueError("stopped before loading")

    monkeypatch.setattr(amendlm.bias.evaluate, "evaluate_model", stop)
    (tmp_path / "adapter_config.json").write_text("{}")
    warned = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path), "--benchmarks", "stereoset"])
    assert "--split all includes the StereoSet target terms" in warned.output and warned.exit_code == 1
    held_out = CliRunner().invoke(app, ["eval", "--adapter", str(tmp_path), "--split", "test", "--benchmarks", "stereoset"])
    assert "includes the StereoSet target terms" not in held_out.output


def test_eval_refuses_a_missing_adapter_before_the_split_warning_and_any_model(tmp_path, monkeypatch):
    import amendlm.modeling

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    for adapter, said in ((tmp_path / "no" / "such", "no such adapter directory"),
                          (tmp_path, "not a PEFT adapter directory (no adapter_config.json)")):
        result = CliRunner().invoke(app, ["eval", "--adapter", str(adapter), "--benchmarks", "stereoset"])
        assert result.exit_code == 1 and result.stderr == f"error: --adapter {adapter}: {said}\n", result.stderr


def test_usage_errors_are_one_plain_line_on_stderr_and_help_stays_rich():
    runner = CliRunner()
    cases = {  # arguments -> what the one line must say
        ("eval", "--benchmarks", "stereoset,glue"): "unknown benchmark",
        ("eval", "--batch-size", "x"): "Invalid value for '--batch-size'",
        ("debias", "--nope"): "No such option: --nope",
        ("nosuch",): "No such command 'nosuch'",
        ("merge", "--adapter", "a"): "Missing option '--out' (see 'root merge --help')",
        # every missing input of align train / align eval at once, not one per attempt
        ("align", "train"): "missing --out DIR, --samples FILE (from 'align sample') or --pairs SOURCE and the initial aligner "
                            "(--aligner MODEL or --init-from-proposal-layers K) (see 'root align train --help')",
        ("align", "eval", "--systems", "proposal,par,finetuned"): "missing --aligner (for par) and --finetuned (for finetuned)",
        ("align", "generate", "hi", "--mode", "sir"): "missing --aligner (for --mode sir)",
    }
    for args, said in cases.items():
        result = runner.invoke(app, list(args), prog_name="root")
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and said in result.stderr, (args, result.stderr)
    shown = runner.invoke(app, ["align", "train", "--help"], prog_name="root")
    assert shown.exit_code == 0 and "Usage: root align train" in shown.stdout and "--samples" in shown.stdout
    assert "Options ─" in shown.stdout  # still rich's help panels


def test_every_align_train_option_has_help_text():
    import typer.main

    train = typer.main.get_command(app).commands["align"].commands["train"]
    assert len(train.params) > 20
    assert [p.name for p in train.params if not (getattr(p, "help", None) or "").strip()] == []


DEVICE_COMMANDS = {  # command -> arguments that are otherwise valid (a run would load a model next)
    "align sample": ["align", "sample", "--proposal", "{model}", "--out", "{tmp}/s2.jsonl", "--limit", "1"],
    "align train": ["align", "train", "--out", "{tmp}/run", "--samples", "{tmp}/s.jsonl", "--proposal", "{model}",
                    "--init-from-proposal-layers", "1", "--max-steps", "1"],
    "align generate": ["align", "generate", "hi", "--proposal", "{model}", "--mode", "proposal"],
    "align eval": ["align", "eval", "--proposal", "{model}", "--systems", "proposal", "--limit", "1", "--out", "{tmp}/e.json"],
    "eval": ["eval", "--model", "{model}", "--benchmarks", "perplexity", "--limit", "1"],
    "serve": ["serve", "--model", "{model}", "--port", "0"],
    "merge": ["merge", "--model", "{model}", "--adapter", "{tmp}/adapter", "--out", "{tmp}/merged"],
}


@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_an_unavailable_or_malformed_device_is_one_line_naming_the_flag_before_any_model_loads(command, tmp_path, monkeypatch):
    import torch

    import amendlm.modeling
    from tests.conftest import make_byte_tokenizer, make_tiny_llama

    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "s.jsonl").write_text("")  # proposal samples (none; no .config.json beside: accepted as they are)
    loaded = []

    def no_model(*args, **kwargs):
        loaded.append(args)
        raise RuntimeError("a model loaded")

    monkeypatch.setattr(amendlm.modeling, "load_model", no_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    args = [a.format(model=tmp_path / "tiny", tmp=tmp_path) for a in DEVICE_COMMANDS[command]]
    cases = [("cuda", "--device cuda: no such accelerator on this machine"), ("gpu", "--device gpu: not a device")]
    if command == "align train":  # Accelerate places the model: a device type only (auto is taken, as by debias)
        cases += [("cuda:0", "--device cuda:0: give the type only (cuda), no card index")]  # debias's words too
    else:  # the model goes to the device as given, index and all; auto is no torch device
        cases += [("cuda:1", "--device cuda:1: no such accelerator"), ("auto", "--device auto: not a device")]
    for device, said in cases:
        result = CliRunner().invoke(app, [*args, "--device", device])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (device, result.output)
        assert len(result.stderr.splitlines()) == 1 and said in result.stderr, (device, result.stderr)
    assert loaded == [] and not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


OUT_FILE_COMMANDS = {  # command -> arguments before --out / --markdown (no model may load: the check comes first)
    "eval": ["eval", "--benchmarks", "perplexity", "--out"],
    "compare --out": ["compare", "{tmp}/missing.json", "--out"],
    "compare --markdown": ["compare", "{tmp}/missing.json", "--markdown"],
    "align sample": ["align", "sample", "--limit", "1", "--out"],
    "align generate": ["align", "generate", "hi", "--mode", "proposal", "--out"],
    "align eval": ["align", "eval", "--systems", "proposal", "--limit", "1", "--out"],
}


@pytest.mark.parametrize("command", list(OUT_FILE_COMMANDS))
def test_an_out_file_that_cannot_be_written_is_one_line_before_anything_runs(command, tmp_path, monkeypatch):
    import amendlm.modeling

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "results").mkdir()
    (tmp_path / "README.md").write_text("a file\n")
    option = "--markdown" if command.endswith("--markdown") else "--out"
    args = [a.format(tmp=tmp_path) for a in OUT_FILE_COMMANDS[command]]
    for out, said in ((tmp_path / "results", f"{option} {tmp_path / 'results'}: is a directory; give a file path such as "
                                             f"{tmp_path / 'results'}/"),
                      (tmp_path / "README.md" / "x.json", f"parent {tmp_path / 'README.md'} is not a directory")):
        result = CliRunner().invoke(app, [*args, str(out)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (out, result.output)
        assert len(result.stderr.splitlines()) == 1 and said in result.stderr, (out, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "results"] and not any((tmp_path / "results").iterdir())


OUT_DIRECTORY_COMMANDS = {
    "merge": ["merge", "--adapter", "{tmp}"],
    "debias": ["debias", "--no-progress"],
    "finetune": ["finetune"],
    "align train": ["align", "train", "--pairs", "stereoset", "--aligner", "x"],
}


@pytest.mark.parametrize("command", list(OUT_DIRECTORY_COMMANDS))
def test_an_out_directory_that_is_a_file_is_one_line_before_any_model_loads(command, tmp_path, monkeypatch):
    import amendlm.finetune
    import amendlm.modeling
    import amendlm.ram.train
    from amendlm.unlearn import trainer

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(amendlm.finetune, "finetune_variant", lambda *a, **k: pytest.fail("fine-tuning started"))
    monkeypatch.setattr(amendlm.ram.train, "train_aligner", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "README.md").write_text("a file\n")
    args = [a.format(tmp=tmp_path) for a in OUT_DIRECTORY_COMMANDS[command]]
    for out, said in ((tmp_path / "README.md", f"--out {tmp_path / 'README.md'}: is a file, not a directory"),
                      (tmp_path / "README.md" / "run", f"parent {tmp_path / 'README.md'} is not a directory")):
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), (out, result.output)
        assert len(result.stderr.splitlines()) == 1 and said in result.stderr, (out, result.stderr)
    assert (tmp_path / "README.md").read_text() == "a file\n"


def test_merge_reports_a_missing_adapter_as_an_input_error_like_eval(tmp_path):
    missing = tmp_path / "nonexistent"
    for args in (["merge", "--adapter", str(missing), "--out", str(tmp_path / "merged")],
                 ["eval", "--adapter", str(missing), "--benchmarks", "perplexity", "--limit", "1"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and result.stderr == f"error: --adapter {missing}: no such adapter directory\n", result.output
    assert not (tmp_path / "merged").exists()


def test_align_sample_refuses_an_out_that_holds_no_samples_before_any_model_loads(tmp_path, monkeypatch):
    import amendlm.modeling
    from amendlm.ram.sample import SampleConfig, check_inputs

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "adir").mkdir()
    for out, said in ((other, f"error: --out {other} line 1: invalid JSON: not a samples file of 'align sample' to resume; "
                              "give a new .jsonl path\n"),
                      (tmp_path / "adir", f"error: --out {tmp_path / 'adir'}: is a directory; give a file path such as "
                                          f"{tmp_path / 'adir' / 'samples.jsonl'}\n")):
        result = CliRunner().invoke(app, ["align", "sample", "--out", str(out), "--limit", "1"])
        assert result.exit_code == 1 and result.stderr == said, result.stderr
    assert other.read_text() == "root:x:0:0:root:/root:/bin/bash\n" and not any((tmp_path / "adir").iterdir())
    samples = tmp_path / "s.jsonl"  # an interrupted run's file (a half-written last line) is resumed, not refused
    samples.write_text(json.dumps({"id": "a", "sample": "text"}) + '\n{"id": "b", "sam')
    check_inputs(SampleConfig(proposal="unused", out=str(samples)), check_model=False)


def test_serve_checks_its_aligners_and_adapter_before_any_model_loads(tmp_path, monkeypatch):
    import amendlm.modeling
    import amendlm.serve.server

    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(amendlm.serve.server, "serve", lambda *a, **k: pytest.fail("the server started"))
    for args, said, code in ((["--aligner", "noequals"], "error: --aligner noequals: expected NAME=DIR", 2),
                             (["--aligner", "a+b=dir"], "error: --aligner a+b=dir: expected NAME=DIR with a NAME without '+'", 2),
                             (["--aligner", f"x={tmp_path / 'nothing'}"], f"error: --aligner {tmp_path / 'nothing'}: no such model directory", 1),
                             (["--adapter", str(tmp_path / "nothing")], f"error: --adapter {tmp_path / 'nothing'}: no such adapter directory", 1),
                             (["--model", str(tmp_path / "nothing")], f"error: --model {tmp_path / 'nothing'}: no such model directory", 1)):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == code and len(result.stderr.splitlines()) == 1, result.output
        assert result.stderr.startswith(said), result.stderr


def test_serve_takes_a_bare_embedded_aligner_name(monkeypatch):
    import amendlm.modeling
    import amendlm.serve.server

    seen = []
    monkeypatch.setattr(amendlm.modeling, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(amendlm.serve.server, "serve", lambda config, **k: seen.append(config))
    result = CliRunner().invoke(app, ["serve", "--aligner", "smollm2-135m-instruct"])
    assert result.exit_code == 0 and seen[0].aligners == {"smollm2-135m-instruct": "smollm2-135m-instruct"}, result.output


def test_help_states_what_align_train_prints_marks_its_out_required_and_what_verbose_does(tmp_path):
    from amendlm.ram.command_helpers import train_summary_line

    runner = CliRunner(env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    shown = " ".join(runner.invoke(app, ["align", "train", "--help"]).stdout.split())
    summary = {"steps": 37, "n_examples": 411, "seconds": 1234.4, "seconds_this_run": 99.0, "n_heldout": 9,
               "heldout": {"loss": 1.23456}, "selection": {"kept": {"step": 20, "worst_gap": 1.5, "lms_drop": 0.7}},
               "aligner": str(tmp_path / "aligner")}
    line = train_summary_line(summary, tmp_path)
    no_heldout = train_summary_line({**summary, "heldout": None, "n_heldout": 0}, tmp_path)
    # each part the help says the last line holds, and what the line produced from a summary shows for it
    for part, produced in (("the steps", "37 steps"), ("the examples", "411 examples"), ("the training seconds", "1234 s"),
                           ("those of this run too", "(99 s in this run)"), ("the last held-out loss", "loss 1.2346"),
                           ("that none was held out", None), ("the val evaluation kept", "val evaluation of step 20"),
                           ("where the aligner", str(tmp_path / "aligner")),
                           ("OUT/train_summary.json", str(tmp_path / "train_summary.json"))):
        assert part in shown, part
        assert (produced in line) if produced else ("no held-out loss" in no_heldout), (part, line)
    out_line = next(line for line in runner.invoke(app, ["align", "train", "--help"]).stdout.splitlines() if "--out " in line)
    debias_out = next(line for line in runner.invoke(app, ["debias", "--help"]).stdout.splitlines() if "--out " in line)
    assert out_line.split()[1] == debias_out.split()[1] == "*" and "[required]" in out_line and "[required]" in debias_out
    assert "Required." not in out_line
    root = " ".join(runner.invoke(app, ["--help"]).stdout.split())
    assert "show an input error (exit status 1" in root and "usage errors (exit status 2) stay one line" in root


def test_at_info_level_an_input_error_is_raised_and_a_usage_error_stays_one_line(tmp_path, caplog):
    """What ``-v`` (INFO logging; pytest's own log handlers keep ``basicConfig`` from setting it here) does."""
    import logging

    adapter = ["eval", "--adapter", str(tmp_path / "none"), "--benchmarks", "stereoset"]
    plain = CliRunner().invoke(app, adapter)
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit), plain.output
    with caplog.at_level(logging.INFO):
        verbose = CliRunner().invoke(app, adapter)
        usage = CliRunner().invoke(app, ["debias", "--out", str(tmp_path / "run"), "--model", "/nonexistent/m",
                                         "--max-steps", "0"])
    assert verbose.exit_code == 1 and isinstance(verbose.exception, FileNotFoundError)  # raised: its traceback shows
    assert usage.exit_code == 2 and usage.stderr.startswith("error: --max-steps must be >= 1, got 0"), usage.output
