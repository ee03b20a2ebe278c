"""The benchmark runners end to end on a tiny random model and toy files; perplexity windows."""

import json
import math

import pytest
import torch

from amendlm.bias.evaluate import EvalConfig, evaluate, perplexity_windows
from amendlm.modeling import attach_adapter

from .test_data import CROWS_HEADER, GOOD_INTER, GOOD_INTRA, write_jsonl


def test_perplexity_windows_score_every_token_once():
    tokens = list(range(10, 33))  # 23 tokens
    windows = perplexity_windows(tokens, start_id=0, window=8, stride=4)
    assert windows[0].ids == [0, *tokens[:7]] and windows[0].n_scored == 7
    scored = []
    for w in windows:
        assert len(w.ids) <= 8
        scored.extend(w.ids[len(w.ids) - w.n_scored :])
    assert scored == tokens
    assert all(len(w.ids) - w.n_scored >= 8 - 4 for w in windows[1:])  # context kept


@pytest.fixture()
def toy_files(tmp_path):
    stereoset = write_jsonl(tmp_path / "stereoset.jsonl", [GOOD_INTRA, GOOD_INTER, dict(GOOD_INTER, target="Spain")])
    crows = tmp_path / "crows.csv"
    crows.write_text(CROWS_HEADER + "0,Old people are slow.,Young people are slow.,stereo,age,[],a0,[]\n"
                     "1,Rich men are kind.,Poor men are kind.,antistereo,socioeconomic,[],a1,[]\n")
    wiki = write_jsonl(tmp_path / "wiki.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 5)
    return stereoset, crows, wiki


def test_evaluate_tiny_model(tiny_llama, byte_tokenizer, toy_files):
    stereoset, crows, wiki = toy_files
    config = EvalConfig(stereoset=str(stereoset), crows_pairs=str(crows), wikitext=str(wiki), progress=False, ppl_window=64, ppl_stride=32)
    results = evaluate(tiny_llama, byte_tokenizer, config)
    ss = results["benchmarks"]["stereoset"]["scores"]
    assert set(ss) == {"intrasentence", "intersentence", "overall"}
    assert ss["overall"]["overall"]["n_clusters"] == 3 and ss["overall"]["overall"]["n_targets"] == 3
    assert ss["intersentence"]["race"]["n_targets"] == 2
    crows_result = results["benchmarks"]["crows-pairs"]["scores"]
    assert crows_result["overall"]["n_pairs"] == 2 and set(crows_result) == {"overall", "age", "socioeconomic"}
    ppl = results["benchmarks"]["perplexity"]
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll_per_token"]))
    assert 1 < ppl["perplexity"] < 10 * len(byte_tokenizer)  # a random model is near uniform
    assert len(results["benchmarks"]["stereoset"]["data_sha256"]) == 64
    # the per-unit records behind the bootstrap intervals reproduce the reported scores
    per_target = results["benchmarks"]["stereoset"]["per_target"]
    assert sum(n for n, _, _ in per_target["overall"].values()) == 3
    ss_from_counts = sum(100.0 * pro / n for n, pro, _ in per_target["overall"].values()) / len(per_target["overall"])
    assert ss_from_counts == pytest.approx(ss["overall"]["overall"]["ss"])
    per_pair = results["benchmarks"]["crows-pairs"]["per_pair"]
    assert 100.0 * sum(per_pair["more_higher"]) / 2 == pytest.approx(crows_result["overall"]["metric"])
    json.dumps(results)  # results are plain data


def test_eval_config_validation():
    with pytest.raises(ValueError, match="unknown benchmark"):
        EvalConfig(benchmarks=["stereoset", "glue"])
    with pytest.raises(ValueError, match="unknown dtype"):
        EvalConfig(dtype="fp8")
    with pytest.raises(ValueError, match="unknown split"):
        EvalConfig(split="dev")
    with pytest.raises(ValueError, match="ppl_stride < ppl_window"):
        EvalConfig(ppl_window=64, ppl_stride=64)


def test_adapter_changes_scores_and_wrong_base_is_rejected(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from .conftest import make_tiny_llama

    peft_model = get_peft_model(make_tiny_llama(259), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = attach_adapter(make_tiny_llama(259), tmp_path / "adapter")
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    wider = make_tiny_llama(259, hidden_size=48, num_attention_heads=4)
    with pytest.raises(Exception, match="size mismatch|different base"):
        attach_adapter(wider, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        attach_adapter(make_tiny_llama(259), tmp_path)


def test_adapter_for_fewer_layers_is_rejected_and_one_without_effect_is_loaded_with_a_warning(tmp_path, caplog):
    from peft import LoraConfig, get_peft_model

    from .conftest import make_tiny_llama

    one_layer = get_peft_model(make_tiny_llama(259, num_hidden_layers=1), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    one_layer.save_pretrained(tmp_path / "one_layer")
    with pytest.raises(ValueError, match="does not fit this model"):
        attach_adapter(make_tiny_llama(259), tmp_path / "one_layer")
    untrained = get_peft_model(make_tiny_llama(259), LoraConfig(r=4, target_modules=["q_proj"]))  # lora_B = 0
    untrained.save_pretrained(tmp_path / "untrained")
    base, ids = make_tiny_llama(259), torch.tensor([[5, 9, 17]])
    with torch.no_grad():
        expected = base(ids).logits
    with caplog.at_level("WARNING", logger="amendlm.adapters"):
        loaded = attach_adapter(base, tmp_path / "untrained")
    assert "every lora_B is zero: a valid adapter equal to the base model" in caplog.text
    assert "kept step 0" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)  # evaluation proceeds on the base model
    # a debias run that kept step 0 (summary.json) is named as such
    (tmp_path / "untrained" / "summary.json").write_text(json.dumps({"best_step": 0, "weights_saved": "best (step 0)"}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="amendlm.adapters"):
        attach_adapter(make_tiny_llama(259), tmp_path / "untrained")
    assert "the run kept step 0 (no evaluation beat it), so every lora_B is zero" in caplog.text


def test_stereoset_runner_turns_scores_into_metrics(monkeypatch, byte_tokenizer, tmp_path):
    """Fixed sentence scores -> hand-computed SS/LMS per task and bias type (a target in both tasks)."""
    import amendlm.bias.evaluate as evaluate_module
    from amendlm.scoring import Scores

    rows = [GOOD_INTRA, dict(GOOD_INTER, target="chess player", bias_type="profession"), GOOD_INTER]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    # per cluster (stereotype, anti, unrelated) mean log-probs
    means = [[-1.0, -2.0, -3.0],   # chess intra: pro, related 2
             [-2.0, -1.0, -1.5],   # chess inter: anti, related 1
             [-1.0, -1.0, -0.5]]   # Ethiopia inter: tie (not pro), related 0
    flat = torch.tensor(means).flatten()
    monkeypatch.setattr(evaluate_module, "score_pairs", lambda *a, **k: Scores(flat.clone(), torch.ones(9, dtype=torch.long)))
    result = evaluate_module.run_stereoset(None, byte_tokenizer, EvalConfig(stereoset=str(path), progress=False))["scores"]
    assert result["intrasentence"]["profession"]["ss"] == 100.0
    assert result["intersentence"]["overall"]["ss"] == 0.0  # two targets, neither pro
    assert result["intersentence"]["overall"]["lms"] == pytest.approx((50.0 + 0.0) / 2)
    # overall: chess player has 2 clusters (SS 50, LMS 75), Ethiopia 1 (SS 0, LMS 0) -> macro
    assert result["overall"]["overall"]["ss"] == pytest.approx(25.0)
    assert result["overall"]["overall"]["lms"] == pytest.approx(37.5)
    assert result["overall"]["profession"]["n_clusters"] == 2 and result["overall"]["overall"]["n_targets"] == 2
