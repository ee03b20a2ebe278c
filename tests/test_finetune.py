"""``amendlm finetune``: a short full fine-tune of a tiny random Llama saved as a loadable variant."""

from __future__ import annotations

import json

import pytest
import torch

from amendlm.data.io import DataError
from amendlm.finetune import (
    FinetuneConfig, chunk_token_ids, finetune_variant, language_modeling_collator, read_texts, training_dtype,
)
from .conftest import make_byte_tokenizer, make_tiny_llama

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


def test_eos_separators_are_out_of_the_loss_when_pad_is_eos(tiny_llama):
    tokenizer = make_byte_tokenizer()
    tokenizer.pad_token = None  # like GPT-2 / Llama tokenizers: the collator falls back to EOS
    # "ab" EOS "cde" EOS "f" EOS = 9 tokens -> chunks [a b EOS c], [d e EOS f]; the last EOS is dropped
    chunks = chunk_token_ids(["ab", "cde", "f"], tokenizer, chunk_tokens=4)
    batch = language_modeling_collator(tokenizer)([{"input_ids": ids} for ids in chunks])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    eos_mask = batch["input_ids"] == tokenizer.eos_token_id
    assert eos_mask.tolist() == [[False, False, True, False]] * 2
    assert (batch["labels"][eos_mask] == -100).all()
    assert torch.equal(batch["labels"][~eos_mask], batch["input_ids"][~eos_mask])

    # the model's loss is the mean CE (natural log) of the 4 non-EOS targets at positions 1..3:
    # b (after a), c (after a b EOS), e (after d), f (after d e EOS); "predict EOS" is never trained
    logits = tiny_llama(input_ids=batch["input_ids"]).logits  # (batch=2, seq_len=4, vocab)
    logps = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    targets = batch["input_ids"][:, 1:]
    target_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (2, 3)
    expected = -target_logps[targets != tokenizer.eos_token_id].mean()
    assert torch.allclose(tiny_llama(**batch).loss, expected, atol=1e-6)

    # a distinct pad token (the byte tokenizer's <pad>): EOS separators are trained on
    batch = language_modeling_collator(make_byte_tokenizer())([{"input_ids": ids} for ids in chunks])
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_read_texts_skips_blank_and_limits(texts_file):
    path, texts = read_texts(str(texts_file), field="document")
    assert path == texts_file and texts == TEXTS
    assert read_texts(str(texts_file), field="document", limit=3)[1] == TEXTS[:3]


def test_read_texts_txt_is_one_text_per_non_blank_line(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n   \nsecond text\r\nthird text\n")
    assert read_texts(str(path), field="ignored") == (path, ["first text", "second text", "third text"])
    assert read_texts(str(path), limit=2)[1] == ["first text", "second text"]
    path.write_bytes(b"fine\nlatin-1 caf\xe9\n")
    with pytest.raises(DataError, match=r"texts\.txt line 2: not UTF-8 text"):
        read_texts(str(path))


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
    # one CPU device, no accumulation: the global batch is batch_size
    assert summary["sequences_per_step"] == 2 and summary["tokens_per_step"] == 2 * 32
    assert summary["dtype"] == "fp32" and summary["dtype_auto"] is False


def test_bf16_run_on_txt_saves_fp32_weights(tmp_path, base_dir):
    from safetensors import safe_open

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "variant"
    config = FinetuneConfig(out=str(out), model=str(base_dir), texts=str(texts), chunk_tokens=32,
                            max_steps=2, batch_size=2, lr=1e-2, dtype="bf16", cpu=True)
    finetune_variant(config)  # ~0.5 s on one CPU thread

    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "bf16" and summary["steps"] == 2 and summary["texts"] == len(TEXTS)
    assert summary["texts_path"] == str(texts)


def test_chunks_longer_than_the_model_positions_are_refused(tmp_path, base_dir, texts_file):
    # the tiny Llama has max_position_embeddings=256
    config = FinetuneConfig(out=str(tmp_path / "out"), model=str(base_dir), texts=str(texts_file), chunk_tokens=257)
    with pytest.raises(ValueError, match="chunk_tokens 257 exceeds the model's max_position_embeddings 256"):
        finetune_variant(config)
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_before_loading(tmp_path, texts_file):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = FinetuneConfig(out=str(out), model=str(tmp_path / "no-such-model"), texts=str(texts_file))
    with pytest.raises(FileExistsError, match="not empty"):
        finetune_variant(config)
    assert (out / "keep.txt").read_text() == "mine"


def test_out_that_is_a_file_is_refused(tmp_path, texts_file):
    out = tmp_path / "taken.bin"
    out.write_text("mine")
    config = FinetuneConfig(out=str(out), model=str(tmp_path / "no-such-model"), texts=str(texts_file))
    with pytest.raises(FileExistsError, match=r"taken\.bin is an existing file, not a directory"):
        finetune_variant(config)
    assert out.read_text() == "mine"


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


def test_training_dtype_names_and_auto(monkeypatch):
    import amendlm.modeling

    assert training_dtype("fp32") == torch.float32 and training_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        training_dtype("fp8")

    # "auto" is resolved by amendlm.modeling.resolve_dtype for the Trainer's device (here forced to the CPU)
    calls = []

    def fake_resolve_dtype(name, device):
        calls.append((name, torch.device(device)))
        return resolved

    monkeypatch.setattr(amendlm.modeling, "resolve_dtype", fake_resolve_dtype, raising=False)
    resolved = torch.bfloat16
    assert training_dtype("auto", cpu=True) == torch.bfloat16
    assert calls == [("auto", torch.device("cpu"))]
    resolved = torch.float16  # not a dtype the Trainer path supports: an error, not a silent fp32 run
    with pytest.raises(ValueError, match="float32 or bfloat16.*'auto' gives torch.float16"):
        training_dtype("auto", cpu=True)


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
