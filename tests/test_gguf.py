"""A local .gguf file as --model: converted once (content-addressed), exact weights and token ids,
and an unsupported tensor type named before transformers is asked to load it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from amendlm import resources
from amendlm.cli import app
from amendlm.modeling import load_model
from amendlm.provenance import weights_record
from amendlm.resources import file_sha256, resolve_model

from .conftest import make_tiny_llama

MERGES = ["Ġ t", "h e", "Ġt he"]  # so that " the" is one token and the BPE has work to do
TEXTS = ["The nurse was caring.", " the cat", "Hello, world!\nthe end", "über 42"]
_HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def byte_level_tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    return ["<s>", "</s>", "<pad>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


def _rotary_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows from transformers' half-split rotary layout to GGUF's interleaved pairs, per head."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_llama_gguf(path, model, tokens: list[str], extra_tensor: np.ndarray | None = None) -> None:
    """Write ``model`` (a tiny Llama) and a byte-level BPE vocabulary as an F32 GGUF file with gguf's GGUFWriter."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for layer in range(config.num_hidden_layers):
        names.update({f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{name}.weight" for hf, name in _HF_TO_GGUF.items()})
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        weight = state[hf_name].numpy()
        if gguf_name.endswith("attn_q.weight"):
            weight = _rotary_interleaved(weight, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            weight = _rotary_interleaved(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight, dtype=np.float32))
    if extra_tensor is not None:
        writer.add_tensor("extra.weight", extra_tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_ids(tokens: list[str], text: str) -> list[int]:
    """Ids of ``text`` under a byte-level BPE built directly from the vocabulary and merges written to the GGUF."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in MERGES]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return bpe.encode(text).ids


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AMENDLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def tiny_gguf(tmp_path):
    tokens = byte_level_tokens()
    model = make_tiny_llama(len(tokens), seed=3)
    path = tmp_path / "files" / "tiny-llama.f32.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path, model, tokens)
    return path, model, tokens


def test_a_gguf_file_loads_with_its_exact_weights_and_token_ids(tiny_gguf, home):
    from transformers import AutoTokenizer

    path, original, tokens = tiny_gguf
    model, tokenizer = load_model(str(path))
    ids = torch.tensor([[0, 5, 6, 7, 8, 100, 200, 261]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-5)
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # transformers' own GGUF tokenizer
    for text in TEXTS:
        converted = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert converted == reference_ids(tokens, text) == direct(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(" the", add_special_tokens=False)["input_ids"] == [tokens.index("Ġthe")]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    digest = file_sha256(path)
    converted_dir = home / "models" / "gguf" / f"tiny-llama.f32-{digest[:16]}"
    assert model.name_or_path == str(converted_dir)
    recorded = weights_record(model)["model"]
    assert recorded["gguf"]["sha256"] == digest and "model.safetensors" in recorded["files"]


def test_a_gguf_file_is_converted_once_per_content(tiny_gguf, home, monkeypatch, tmp_path):
    path, _, tokens = tiny_gguf
    first = resolve_model(str(path))

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(resources, "_convert_gguf", no_conversion)
    assert resolve_model(str(path)) == first
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(path, copy)
    assert resolve_model(str(copy)).endswith(first.rsplit("-", 1)[1])  # same content, same conversion
    monkeypatch.undo()
    monkeypatch.setenv("AMENDLM_HOME", str(home))
    write_tiny_llama_gguf(path, make_tiny_llama(len(tokens), seed=4), tokens)  # rewritten in place
    second = resolve_model(str(path))
    assert second != first and [p.name for p in (home / "models" / "gguf").iterdir() if p.name.startswith(".")] == []


def test_an_unsupported_tensor_type_is_named_before_transformers_loads_the_file(tmp_path, home, monkeypatch):
    tokens = byte_level_tokens()
    path = tmp_path / "f64.gguf"
    write_tiny_llama_gguf(path, make_tiny_llama(len(tokens)), tokens, extra_tensor=np.zeros((4, 32), dtype=np.float64))
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("transformers must not be asked to load it")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match=r"f64.gguf: GGUF quantisation type F64 \(tensor 'extra.weight'\) is not supported "
                                         r"by transformers' GGUF loader; supported: F32, F16, .*Q4_K"):
        resolve_model(str(path))
    assert not any((home / "models" / "gguf").iterdir())
    result = CliRunner().invoke(app, ["eval", "--model", str(path), "--benchmarks", "perplexity"])
    assert result.exit_code == 1 and "error: " in result.output and "F64" in result.output
    assert "Traceback" not in result.output


def test_the_supported_types_follow_the_installed_gguf_dequantiser():
    supported = resources.gguf_supported_types()
    assert {"F32", "F16", "Q4_1", "Q4_K", "Q8_0"} <= set(supported)
    assert "F64" not in supported and "I32" not in supported


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, home):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="broken.gguf: not a readable GGUF file"):
        resolve_model(str(fake))


@pytest.mark.integration
def test_the_embedded_gguf_converts_with_the_tokenizer_of_the_file():
    """The embedded SmolLM2 GGUF as a plain file path: ids equal the GGUF's own vocabulary and tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    from amendlm.modeling import load_tokenizer
    from amendlm.resources import MODELS

    path = MODELS["smollm2-135m-instruct"].locate()
    tokenizer = load_tokenizer(str(path))  # the converted (saved and reloaded) tokenizer
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    for text in ["The nurse was caring.", "My neighbour is from Spain. She cooks paella!", "<|im_start|>user\nhi"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == direct(text, add_special_tokens=False)["input_ids"]
        assert [vocab[i] for i in ids] == tokenizer.convert_ids_to_tokens(ids)
    assert resolve_model(str(path)) == resolve_model("smollm2-135m-instruct")  # the embedded file: its conversion


def test_a_conversion_without_its_gguf_record_gets_one_with_the_absolute_path(tiny_gguf, home, monkeypatch, tmp_path):
    path, _, _ = tiny_gguf
    monkeypatch.chdir(path.parent)
    converted = Path(resolve_model(path.name))  # typed as a relative path
    record = json.loads((converted / resources.GGUF_SOURCE).read_text())
    assert record == {"gguf_file": str(path.resolve()), "sha256": file_sha256(path)}
    (converted / resources.GGUF_SOURCE).unlink()  # a conversion made before the record existed
    monkeypatch.setattr(resources, "_convert_gguf", lambda *args: pytest.fail("converted again"))
    assert resolve_model(str(path)) == str(converted)
    assert json.loads((converted / resources.GGUF_SOURCE).read_text()) == record
    assert [p.name for p in converted.iterdir() if p.name.startswith(".")] == []
