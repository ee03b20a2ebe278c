"""benchmarks/bench_unlearn.py's FLOP counts: the formulas by hand, the positions counted on a tiny model."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from .conftest import make_byte_tokenizer, make_tiny_llama

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    for path in (str(REPO), str(REPO / "benchmarks")):  # as experiments/bench_common.load_benchmark
        if path not in sys.path:
            sys.path.append(path)
    return importlib.import_module("benchmarks.bench_unlearn")


def test_nominal_and_executed_flops_by_hand(bench):
    assert bench.nominal_flops(10, policy_tokens=3, reference_tokens=2) == 6 * 10 * 3 + 2 * 10 * 2  # 220
    # body B = 100, head H = 10, LoRA L = 4; policy: body 5 positions, head 3; reference: body 7, head 2
    # policy 4 (100*5 + 10*3) = 2120, LoRA 6*4*5 = 120, reference 2 (100*7 + 10*2) = 1440
    assert bench.executed_flops(100, 10, 4, 5, 3, 7, 2) == 3680
    # full fine-tuning: the base's weight gradients too, 6 (100*5 + 10*3) = 3180
    assert bench.executed_flops(100, 10, 4, 5, 3, 7, 2, base_trained=True) == 4740
    # every reference log-prob from the cache: no reference pass
    assert bench.executed_flops(100, 10, 4, 5, 3, 0, 0) == 2240


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_split_of_a_tiny_llama_with_lora(bench, tied):
    from peft import LoraConfig, get_peft_model

    vocab = 259
    model = make_tiny_llama(vocab, tie_word_embeddings=tied)  # d_model 32, MLP 64, 2 layers, 4 heads, 2 KV heads of 8
    # a layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate, up, down 3 * 32*64 + 2 norms of 32 = 9280; + final norm 32
    body = 2 * 9280 + 32
    assert bench.parameter_split(model) == {"body": body, "head": vocab * 32, "lora": 0}
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora = 2 * (2 * (32 + 32) + 2 * (32 + 16))  # per layer r (d_in + d_out) for q and v
    assert bench.parameter_split(wrapped) == {"body": body, "head": vocab * 32, "lora": lora}


@pytest.mark.parametrize("packing", [False, True])
def test_the_positions_counted_are_those_the_passes_ran(bench, tmp_path, packing):
    tokenizer = make_byte_tokenizer()
    make_tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    rows = []

    class Queue:
        put = rows.append

    bench._measure(("default", packing, "adapter", "fp32"), str(tmp_path / "tiny"), 1, 2, Queue())
    row = rows[0]
    ran, split = row["positions_per_step"], row["parameter_split"]
    assert row["executed_flops_per_step"] == bench.executed_flops(split["body"], split["head"], split["lora"], **ran)
    assert row["nominal_flops_per_step"] == bench.nominal_flops(row["params"], row["policy_tokens_per_step"],
                                                                row["reference_tokens_per_step"])
    if not packing:  # one padded pass per stream, the head on every position; the reference for forget and kl
        assert ran["policy_body"] == ran["policy_head"] == row["padded_tokens_per_step"]
        assert ran["reference_body"] == ran["reference_head"] > 0
    else:  # one packed pass, the head on the scored positions only (fewer than the examples' tokens)
        assert ran["policy_body"] == row["packed_tokens_per_step"]
        assert 0 < ran["policy_head"] < row["policy_tokens_per_step"]
        assert ran["reference_head"] < ran["reference_body"]


def test_both_fractions_of_peak_reach_the_json_and_the_printed_table(bench, monkeypatch, capsys):
    def fake_run(spec, model_name, steps, batch_size):  # a measured row, as _measure gives it
        return {"recipe": spec[0], "packing": spec[1], "reference": spec[2], "dtype": spec[3], "label": bench.config_label(*spec),
                "batch_sizes": {"forget": 8}, "seconds_per_step": 2.0, "peak_memory_mib": 100.0,
                "gflops_per_s": 30.0, "executed_gflops_per_s": 12.0}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda dtype: 60.0)
    results = bench.measure("tiny", configs=["default/packed/adapter/fp32"])
    for row in results["rows"]:
        assert (row["fraction_of_matmul_peak"], row["executed_fraction_of_matmul_peak"]) == (0.5, 0.2)
    printed = capsys.readouterr().out
    assert "exec GFLOP/s" in printed and printed.count("   30.0     50 %          12.0     20 %") == 2
