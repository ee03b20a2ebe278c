"""``amendlm finetune``: a short full fine-tune of a tiny random Llama saved as a loadable variant."""

from __future__ import annotations

import json

import pytest
import torch

from amendlm.data.io import DataError
from amendlm.finetune import FinetuneConfig, chunk_token_ids, finetune_variant, read_texts
from .conftest import make_tiny_llama

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(12)]


@pytest.fixture()
def base_dir(tmp_path, byte_tokenizer):
    """A tiny random Llama + byte tokenizer saved as a safetensors model directory."""
    path = tmp_path / "base"
    make_tiny_llama(len(byte_tokenizer)).save_pretrained(str(path), safe_serialization=True)
    byte_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture()
def texts_file(tmp_path):
    """A jsonl with one blank document (skipped, like XSum row 220) among twelve real ones."""
    path = tmp_path / "texts.jsonl"
    rows = [{"document": text} for text in TEXTS[:5]] + [{"document": "  "}] + [{"document": t} for t in TEXTS[5:]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chunks_are_equal_length_with_eos_between_texts(byte_tokenizer):
    # byte tokenizer: one token per byte, so "ab" + EOS + "cde" + EOS = 7 tokens -> one chunk of 4, 3 dropped
    chunks = chunk_token_ids(["ab", "cde"], byte_tokenizer, chunk_tokens=4)
    assert len(chunks) == 1 and len(chunks[0]) == 4
    assert chunks[0][2] == byte_tokenizer.eos_token_id


def test_read_texts_skips_blank_and_limits(texts_file):
    path, texts = read_texts(str(texts_file), field="document")
    assert path == texts_file and texts == TEXTS
    assert read_texts(str(texts_file), field="document", limit=3)[1] == TEXTS[:3]


def test_three_steps_change_weights_and_save_loadable_variant(tmp_path, base_dir, texts_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "variant"
    config = FinetuneConfig(out=str(out), model=str(base_dir), texts=str(texts_file), chunk_tokens=32,
                            max_steps=3, batch_size=2, lr=1e-2, cpu=True)
    assert finetune_variant(config) == out

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".variant.*")), "staging directory left behind"
    assert not [p for p in out.iterdir() if p.name.startswith("trainer.")], "trainer scratch dir left in out"
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), use_safetensors=True)
    variant = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    assert variant.dtype == torch.float32
    base_state, variant_state = base.state_dict(), variant.state_dict()
    assert base_state.keys() == variant_state.keys()
    unchanged = [name for name in base_state if torch.equal(base_state[name], variant_state[name])]
    # every trainable tensor moved (rotary inv_freq buffers are not parameters and are not saved)
    assert not [name for name, _ in base.named_parameters() if name in unchanged]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("ab")["input_ids"] == AutoTokenizer.from_pretrained(str(base_dir))("ab")["input_ids"]

    assert json.loads((out / "finetune_config.json").read_text())["max_steps"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["texts"] == 12
    assert summary["final_loss"] > 0 and summary["mean_loss"] > 0
    assert summary["chunks"] == sum(len(t) + 1 for t in TEXTS) // 32


def test_non_empty_out_is_refused_before_loading(tmp_path, texts_file):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = FinetuneConfig(out=str(out), model=str(tmp_path / "no-such-model"), texts=str(texts_file))
    with pytest.raises(FileExistsError, match="not empty"):
        finetune_variant(config)
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_text_field_names_file_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"document": "fine"}) + "\n" + json.dumps({"text": "wrong field"}) + "\n")
    config = FinetuneConfig(out=str(tmp_path / "out"), model=str(tmp_path / "no-such-model"), texts=str(path))
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: missing field 'document'"):
        finetune_variant(config)
    assert not (tmp_path / "out").exists()


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        FinetuneConfig(out=str(tmp_path), dtype="fp8")
    with pytest.raises(ValueError, match="max_steps"):
        FinetuneConfig(out=str(tmp_path), max_steps=0)


def test_cli_trains_a_variant_and_refuses_to_overwrite_it(tmp_path, base_dir, texts_file):
    from typer.testing import CliRunner

    from amendlm.cli import app

    out = tmp_path / "variant"
    args = ["finetune", "--model", str(base_dir), "--texts", str(texts_file), "--out", str(out),
            "--chunk-tokens", "16", "--max-steps", "2", "--batch-size", "2", "--cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "variant written to" in result.output and (out / "model.safetensors").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "exists and is not empty" in again.output
