"""Integration: the second embedded model, Gemma 3 270M (262k vocabulary, tied embeddings,
sliding-window attention, a tokenizer that adds BOS itself), through the same scorer and LoRA code."""

import pytest
import torch

from amendlm.data.stereoset import LABELS, load_stereoset
from amendlm.modeling import load_model
from amendlm.scoring import encode_pairs, score_pairs, token_logps

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    try:
        return load_model("gemma3-270m")
    except FileNotFoundError as err:  # its packages are not installed (make install installs them)
        pytest.skip(str(err))


def test_it_is_gemma3_with_tied_embeddings_and_a_tokenizer_that_adds_bos(gemma):
    model, tokenizer = gemma
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == len(tokenizer) > 262_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "sliding_attention" in model.config.layer_types
    assert tokenizer("The nurse.")["input_ids"][0] == tokenizer.bos_token_id  # adds BOS by itself


def test_the_token_ids_are_the_gguf_vocabulary(gemma):
    import gguf

    from amendlm.resources import MODELS

    _, tokenizer = gemma
    field = gguf.GGUFReader(MODELS["gemma3-270m"].locate()).fields["tokenizer.ggml.tokens"]
    for text in ["The nurse was caring.", "My neighbour is from Spain. She cooks paella!"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert [bytes(field.parts[field.data[i]]).decode("utf-8") for i in ids] == tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text


def test_exactly_one_bos_is_prepended_and_it_is_not_scored(gemma):
    model, tokenizer = gemma
    text = "The nurse was caring."
    (encoded,) = encode_pairs(tokenizer, [("", text)])
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.ids == [tokenizer.bos_token_id, *plain] and encoded.n_scored == len(plain)
    assert encoded.ids.count(tokenizer.bos_token_id) == 1
    with torch.no_grad():  # by hand: every token after the single BOS, each conditioned on what precedes it
        logits = model(input_ids=torch.tensor([encoded.ids])).logits[0, :-1]
    by_hand = token_logps(logits, torch.tensor(plain)).sum()
    scored = score_pairs(model, tokenizer, [("", text)])
    assert scored.n_tokens.tolist() == [len(plain)]
    assert scored.logp_sum[0] == pytest.approx(float(by_hand), abs=1e-3)


def test_shared_prefix_packing_equals_unpacked_scoring(gemma):
    model, tokenizer = gemma
    every = load_stereoset()
    clusters = [c for c in every if c.task == "intersentence"][:2] + [c for c in every if c.task == "intrasentence"][:1]
    pairs = [cluster.scoring_pair(label) for cluster in clusters for label in LABELS]
    groups = [list(range(i, i + len(LABELS))) for i in range(0, len(pairs), len(LABELS))]
    packed = score_pairs(model, tokenizer, pairs, batch_size=2, groups=groups)
    unpacked = score_pairs(model, tokenizer, pairs, batch_size=4)
    assert torch.equal(packed.n_tokens, unpacked.n_tokens)
    assert torch.allclose(packed.logp_sum, unpacked.logp_sum, atol=2e-3, rtol=1e-4)


def test_lora_targets_are_found(gemma):
    from amendlm.unlearn.models import attention_target_modules, lora_target_modules

    model, _ = gemma
    assert lora_target_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert attention_target_modules(model) == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]


def test_debias_merge_eval_and_align_run_end_to_end_on_it(tmp_path, gemma):
    """Every command on the second architecture through the CLI, at the smallest budgets."""
    import json

    from typer.testing import CliRunner

    from amendlm.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    run("debias", "--model", "gemma3-270m", "--out", tmp_path / "bu", "--max-steps", 1, "--batch-size", 2,
        "--val-clusters", 4, "--kl-texts", "none", "--no-keep-best", "--dtype", "fp32", "--no-progress")
    assert json.loads((tmp_path / "bu" / "summary.json").read_text())["status"] == "completed"
    run("merge", "--model", "gemma3-270m", "--adapter", tmp_path / "bu", "--out", tmp_path / "merged")
    run("eval", "--model", tmp_path / "merged", "--benchmarks", "stereoset", "--limit", 4, "--out", tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["benchmarks"]["stereoset"]["scores"]["overall"]["overall"]["lms"] >= 0

    samples = tmp_path / "samples.jsonl"
    run("align", "sample", "--proposal", "gemma3-270m", "--out", samples, "--limit", 2, "--max-new-tokens", 4,
        "--max-document-tokens", 32)
    assert len(samples.read_text().splitlines()) == 2
    run("align", "train", "--proposal", "gemma3-270m", "--init-from-proposal-layers", 2, "--samples", samples,
        "--out", tmp_path / "ram", "--limit", 2, "--max-steps", 1, "--batch-size", 2, "--max-document-tokens", 32)
    out = run("align", "generate", "The capital of France is", "--proposal", "gemma3-270m", "--aligner", tmp_path / "ram",
              "--mode", "par-kl", "--max-new-tokens", 3, "--no-chat-template")
    assert out.output.strip()
