"""dtype names: fp32 / bf16 as given; auto is bf16 only where the device does bf16 natively fast."""

import json
import math

import pytest
import torch

from amendlm import modeling
from amendlm.bias.evaluate import EvalConfig, evaluate
from amendlm.modeling import autocast, dtype_record, parse_dtype, resolve_dtype


@pytest.fixture()
def fresh_probe(monkeypatch):
    """Forget the per-process probe result before and after the test (and run the probe: no AMENDLM_CPU_BF16)."""
    monkeypatch.delenv(modeling.CPU_BF16_ENV, raising=False)
    modeling.cpu_bf16_is_fast.cache_clear()
    yield
    modeling.cpu_bf16_is_fast.cache_clear()


def test_parse_dtype_validates_names_and_leaves_auto_to_the_device():
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype("auto") is None
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'; choose one of .*'auto'"):
        parse_dtype("fp8")
    with pytest.raises(ValueError, match="resolve_dtype"):
        autocast(parse_dtype("auto"))  # a caller that forgot to resolve fails clearly


@pytest.mark.parametrize("speedup, expected", [(2.4, torch.bfloat16), (1.3, torch.bfloat16), (1.29, torch.float32), (0.1, torch.float32)])
def test_auto_on_the_cpu_is_bf16_only_when_the_probe_finds_it_1_3x_faster(monkeypatch, fresh_probe, speedup, expected):
    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: speedup)
    assert resolve_dtype("auto", "cpu") is expected
    assert resolve_dtype("auto", torch.device("cpu")) is expected


def test_the_probe_runs_once_per_process_and_fixed_names_never_run_it(monkeypatch, fresh_probe):
    calls = []
    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: calls.append(1) or 2.0)
    assert resolve_dtype("fp32", "cpu") is torch.float32 and resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert calls == []
    assert {resolve_dtype("auto", "cpu") for _ in range(3)} == {torch.bfloat16}
    assert calls == [1]


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_asks_torch_for_native_bf16(monkeypatch, native):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(including_emulation) or native)
    assert resolve_dtype("auto", "cuda:0") is (torch.bfloat16 if native else torch.float32)
    assert asked == [False]  # emulated bf16 (pre-Ampere GPUs) is not fast


def test_auto_elsewhere_is_fp32():
    assert resolve_dtype("auto", "meta") is torch.float32


def test_auto_on_this_cpu_runs_the_real_probe(fresh_probe):
    speedup = modeling.cpu_bf16_speedup(size=128, calls=2, repeats=2)
    assert math.isfinite(speedup) and speedup > 0
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_dtype_record_names_the_resolved_dtype_and_whether_auto_chose_it():
    assert dtype_record("auto", torch.bfloat16) == {"dtype": "bf16", "dtype_auto": True}
    assert dtype_record("float32", torch.float32) == {"dtype": "fp32", "dtype_auto": False}


@pytest.mark.parametrize("speedup, recorded", [(1.0, "fp32"), (2.0, "bf16")])
def test_evaluate_records_the_dtype_auto_chose(monkeypatch, fresh_probe, tiny_llama, byte_tokenizer, tmp_path, speedup, recorded):
    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: speedup)
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    config = EvalConfig(benchmarks=["perplexity"], wikitext=str(wiki), dtype="auto", progress=False, ppl_window=64, ppl_stride=32)
    results = evaluate(tiny_llama, byte_tokenizer, config)
    assert results["config"]["dtype"] == recorded and results["config"]["dtype_auto"] is True
    assert math.isfinite(results["benchmarks"]["perplexity"]["perplexity"])


def test_an_adapter_path_error_says_whether_the_directory_is_missing_or_not_an_adapter(tmp_path):
    from amendlm.modeling import attach_adapter

    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        attach_adapter(None, tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        attach_adapter(None, tmp_path)


def test_the_environment_answers_the_probe_for_every_process(fresh_probe, monkeypatch):
    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: pytest.fail("probed"))
    for value, expected in (("0", torch.float32), ("1", torch.bfloat16)):
        monkeypatch.setenv(modeling.CPU_BF16_ENV, value)
        modeling.cpu_bf16_is_fast.cache_clear()
        assert modeling.resolve_dtype("auto", "cpu") == expected
    for value in ("true", "", "2"):  # anything else is refused, never silently probed
        monkeypatch.setenv(modeling.CPU_BF16_ENV, value)
        modeling.cpu_bf16_is_fast.cache_clear()
        with pytest.raises(ValueError, match=f"AMENDLM_CPU_BF16='{value}': expected \"0\" or \"1\""):
            modeling.resolve_dtype("auto", "cpu")
