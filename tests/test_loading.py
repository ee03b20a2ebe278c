"""Loading errors that help (one line naming the path, the hub id or the adapter's base) and
evaluation records that prove which weights they scored, in eval mode."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amendlm import resources
from amendlm.bias.evaluate import EvalConfig, evaluate
from amendlm.cli import app
from amendlm.modeling import eval_mode, load_model
from amendlm.provenance import state_sha256, weights_record
from amendlm.resources import cached_file_sha256, file_sha256, resolve_model
from amendlm.scoring import score_pairs

from .conftest import make_byte_tokenizer, make_tiny_llama


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private AMENDLM_HOME (hash cache, conversions)."""
    monkeypatch.setenv("AMENDLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def model_dir(tmp_path):
    """A tiny Llama saved as safetensors with its tokenizer, named "tiny-32"."""
    model = make_tiny_llama(259)
    model.config._name_or_path = "tiny-32"
    model.save_pretrained(tmp_path / "tiny")
    make_byte_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _adapter(tmp_path, name: str, **overrides):
    """A LoRA adapter (non-zero lora_B) on a tiny Llama built with ``overrides``, recorded base ``name``."""
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(259, **overrides)
    base.name_or_path = name  # what peft records as base_model_name_or_path
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _wiki(tmp_path):
    path = tmp_path / "wiki.jsonl"
    path.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    return path


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]  # besides progress bars
    assert len(lines) == 1, result.output
    return lines[0]


# ---- 3. loading errors ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/no/such/dir", "./runs/missing", "runs/a/missing", "~/no-such-amendlm-model"])
def test_a_missing_local_path_says_so_and_names_it(path):
    with pytest.raises(FileNotFoundError, match=r"no such model directory or \.gguf file") as raised:
        resolve_model(path)
    assert path in str(raised.value)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model("/no/such/model.gguf")


def test_a_directory_without_config_or_a_stray_file_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model(str(tmp_path))
    stray = tmp_path / "weights.txt"
    stray.write_text("x")
    with pytest.raises(ValueError, match="not a model directory or .gguf file"):
        resolve_model(str(stray))


def test_the_cli_names_a_missing_model_path_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", "/no/such/dir", "--benchmarks", "perplexity",
                                      "--wikitext", str(_wiki(tmp_path))])
    assert "/no/such/dir: no such model directory" in _one_line_error(result)


def test_an_uncached_hub_id_offline_says_how_to_pass_a_local_model(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'amendlm-tests/no-such-model' is not in the local Hugging Face cache.*\.gguf") as raised:
        load_model("amendlm-tests/no-such-model")
    assert "\n" not in str(raised.value)


def test_an_adapter_for_another_base_fails_in_one_line_naming_both(tmp_path, model_dir, home):
    wider = _adapter(tmp_path, "tiny-48", hidden_size=48)  # shapes differ: peft's size-mismatch RuntimeError
    with pytest.raises(ValueError, match=r"adapter made for base model 'tiny-48' does not fit model '.*tiny'.*size mismatch") as raised:
        load_model(str(model_dir), adapter=wider)
    assert "\n" not in str(raised.value)
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--adapter", str(wider), "--split", "test",
                                      "--benchmarks", "perplexity", "--wikitext", str(_wiki(tmp_path))])
    line = _one_line_error(result)
    assert "'tiny-48'" in line and str(model_dir) in line and "size mismatch" in line


def test_an_adapter_for_modules_the_model_lacks_names_its_base(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(259)
    base.name_or_path = "other-arch"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "target_modules": ["c_attn"]}))  # a GPT-2 module name
    with pytest.raises(ValueError, match=r"made for base model 'other-arch' does not fit model"):
        load_model(str(model_dir), adapter=tmp_path / "a")


# ---- 4. eval mode and weight hashes ---------------------------------------------------------

@pytest.fixture()
def dropout_llama(byte_tokenizer):
    """A tiny Llama with attention dropout 0.1, in train mode except one submodule the caller froze."""
    model = make_tiny_llama(len(byte_tokenizer), attention_dropout=0.1).train()
    model.model.layers[0].eval()
    return model


def _modes(model):
    return [m.training for m in model.modules()]


def test_scoring_runs_in_eval_mode_and_restores_every_module_mode(dropout_llama, byte_tokenizer):
    pairs = [("", "The nurse was caring."), ("A man.", " He left.")] * 3
    before = _modes(dropout_llama)
    first = score_pairs(dropout_llama, byte_tokenizer, pairs, batch_size=2)
    second = score_pairs(dropout_llama, byte_tokenizer, pairs, batch_size=4, groups=[[0, 1], [2, 3], [4, 5]])
    assert torch.allclose(first.logp_sum, second.logp_sum, atol=1e-4)
    assert _modes(dropout_llama) == before and dropout_llama.training
    with torch.no_grad():  # the test can fail: in train mode this model's dropout changes the logits
        ids = torch.tensor([[0, 5, 6, 7, 8, 9]])
        assert not torch.equal(dropout_llama(input_ids=ids).logits, dropout_llama(input_ids=ids).logits)


def test_evaluate_runs_in_eval_mode_and_restores_modes_even_on_an_exception(dropout_llama, byte_tokenizer, tmp_path):
    config = EvalConfig(benchmarks=["perplexity"], wikitext=str(_wiki(tmp_path)), progress=False, ppl_window=16, ppl_stride=8)
    before = _modes(dropout_llama)
    runs = [evaluate(dropout_llama, byte_tokenizer, config)["benchmarks"]["perplexity"]["perplexity"] for _ in range(2)]
    assert runs[0] == runs[1] and _modes(dropout_llama) == before
    with pytest.raises(RuntimeError, match="boom"), eval_mode(dropout_llama):
        assert not dropout_llama.training
        raise RuntimeError("boom")
    assert _modes(dropout_llama) == before


def test_the_eval_record_hashes_the_model_and_adapter_files(tmp_path, model_dir, home):
    adapter = _adapter(tmp_path, "tiny-32")
    model, tokenizer = load_model(str(model_dir), adapter=adapter)
    config = EvalConfig(benchmarks=["perplexity"], wikitext=str(_wiki(tmp_path)), progress=False, ppl_window=16, ppl_stride=8)
    weights = evaluate(model, tokenizer, config)["weights"]
    assert weights["model"]["files"] == {name: file_sha256(model_dir / name) for name in ("config.json", "model.safetensors")}
    assert weights["adapter"]["files"] == {name: file_sha256(adapter / name)
                                           for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert weights["adapter"]["path"] == str(adapter) and weights["state_sha256"] is None
    # the same path with other weights is told apart
    _adapter(tmp_path, "tiny-32", seed=1)
    model, tokenizer = load_model(str(model_dir), adapter=adapter)
    changed = weights_record(model)["adapter"]["files"]["adapter_model.safetensors"]
    assert changed != weights["adapter"]["files"]["adapter_model.safetensors"]


def test_the_cli_results_json_records_the_weight_hashes(tmp_path, model_dir, home):
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--benchmarks", "perplexity",
                                      "--wikitext", str(_wiki(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    recorded = json.loads(out.read_text())["weights"]["model"]["files"]
    assert recorded["model.safetensors"] == file_sha256(model_dir / "model.safetensors")


def test_in_memory_weights_are_identified_by_a_tensor_hash(tiny_llama, byte_tokenizer):
    record = weights_record(tiny_llama)
    assert record["model"] is None and record["state_sha256"] == state_sha256(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.norm.weight[0] += 1e-3
    assert state_sha256(tiny_llama) != record["state_sha256"]


def test_file_hashes_are_computed_once_per_path_size_and_mtime(tmp_path, home, monkeypatch):
    calls = []
    real = resources.file_sha256
    monkeypatch.setattr(resources, "file_sha256", lambda path: calls.append(path) or real(path))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    first = cached_file_sha256(weights)
    assert cached_file_sha256(weights) == first == real(weights) and len(calls) == 1
    weights.write_bytes(b"abcd")  # size changes: hashed again
    assert cached_file_sha256(weights) == real(weights) != first and len(calls) == 2


# ---- review fixes ---------------------------------------------------------------------------

def test_weights_changed_in_memory_after_loading_change_the_record(tmp_path, model_dir, home):
    adapter = _adapter(tmp_path, "tiny-32")
    model, _ = load_model(str(model_dir), adapter=adapter)
    before = weights_record(model)
    assert before["trainable_sha256"] is not None and before["state_sha256"] is None
    with torch.no_grad():  # the adapter trained further in memory: its files still say the old weights
        next(p for name, p in model.named_parameters() if "lora_B" in name).add_(1e-3)
    after = weights_record(model)
    assert after["adapter"] == before["adapter"] and after["trainable_sha256"] != before["trainable_sha256"]
    plain, _ = load_model(str(model_dir))  # a fine-tuned base model: every parameter requires grad
    first = weights_record(plain)["trainable_sha256"]
    with torch.no_grad():
        plain.model.norm.weight[0] += 1e-3
    assert weights_record(plain)["trainable_sha256"] != first


def test_a_peft_model_without_an_adapter_directory_hashes_only_its_adapter_tensors(model_dir, home, monkeypatch):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from amendlm import provenance

    base, _ = load_model(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    monkeypatch.setattr(provenance, "state_sha256", lambda m: pytest.fail("hashed the whole state"))
    record = weights_record(model)
    adapter_tensors = get_peft_model_state_dict(model)
    assert record["state_sha256"] is None and record["model"]["path"] == str(model_dir)
    assert record["trainable_sha256"] == provenance.tensors_sha256(sorted(adapter_tensors.items()))


def test_the_state_hash_covers_scalar_buffers(tiny_llama):
    tiny_llama.register_buffer("scale", torch.tensor(2.0))
    first = state_sha256(tiny_llama)
    tiny_llama.scale.fill_(3.0)
    assert state_sha256(tiny_llama) != first


def test_unrelated_peft_errors_propagate_unchanged(tmp_path, model_dir, monkeypatch):
    from peft import PeftModel

    adapter = _adapter(tmp_path, "tiny-32")
    boom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fail(*args, **kwargs):
        raise boom

    monkeypatch.setattr(PeftModel, "from_pretrained", fail)
    with pytest.raises(RuntimeError) as raised:
        load_model(str(model_dir), adapter=adapter)
    assert raised.value is boom
    monkeypatch.setattr(PeftModel, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="^other$"):
        load_model(str(model_dir), adapter=adapter)


def test_a_missing_relative_directory_shaped_like_a_hub_id_names_the_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=r"\(offline\), and no local directory 'runs/variant' \(relative to .*\); pass") as raised:
        load_model("runs/variant")
    assert str(tmp_path.resolve()) in str(raised.value) or str(tmp_path) in str(raised.value)


def test_an_adapter_directory_given_as_the_model_says_to_pass_it_as_adapter(tmp_path):
    adapter = _adapter(tmp_path, "tiny-32")
    with pytest.raises(FileNotFoundError, match=r"this is an adapter directory: pass it as --adapter \(with its base model as --model\)"):
        resolve_model(str(adapter))


def test_only_safetensors_and_config_are_hashed_as_model_files(model_dir, home):
    (model_dir / "pytorch_model.bin").write_bytes(b"never loaded")
    model, _ = load_model(str(model_dir))
    assert set(weights_record(model)["model"]["files"]) == {"config.json", "model.safetensors"}


def test_the_hash_cache_is_its_own_file_and_forgets_deleted_files(tmp_path, home, monkeypatch):
    cache = tmp_path / "hashes" / "sha256.json"
    monkeypatch.setenv("AMENDLM_HASH_CACHE", str(cache))
    gone, kept = tmp_path / "gone.bin", tmp_path / "kept.bin"
    gone.write_bytes(b"a")
    kept.write_bytes(b"b")
    cached_file_sha256(gone)
    gone.unlink()
    cached_file_sha256(kept)
    assert list(json.loads(cache.read_text())) == [str(kept.resolve())]
    assert not (home / "sha256.json").exists()


def test_the_test_session_does_not_write_the_real_hash_cache(private_hash_cache):
    assert resources.hash_cache_file() == Path(private_hash_cache) != Path.home() / ".cache" / "amendlm" / "sha256.json"
