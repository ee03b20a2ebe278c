"""RAM data, sampling, training and evaluation on tiny random models (seconds, no embedded model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.ram.data import TaskConfig, cut_tokens, encode_prompt, encode_response, load_task, split_ids
from amendlm.ram.evaluate import AlignEvalConfig, evaluate_systems, rouge_scores
from amendlm.ram.generate import GenerateConfig
from amendlm.ram.losses import LossConfig
from amendlm.ram.sample import SampleConfig, read_samples, sample_proposal
from amendlm.ram.train import TrainConfig, train_aligner

from .conftest import make_byte_tokenizer, make_tiny_llama


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny proposal saved as a model directory and a 12-row prompt/response jsonl."""
    root = tmp_path_factory.mktemp("ram")
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=0)
    model.save_pretrained(root / "proposal")
    tokenizer.save_pretrained(root / "proposal")
    rows = [{"id": f"r{i}", "prompt": f"story {i}: the cat sat", "response": f"cat {i}"} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, tokenizer


def task(root, split="train"):
    return TaskConfig(data=str(root / "data.jsonl"), split=split, n_test=3, max_document_tokens=0)


def test_split_is_deterministic_disjoint_and_order_free():
    ids = [str(i) for i in range(50)]
    first = split_ids(ids, 10, seed=0)
    assert split_ids(list(reversed(ids)), 10, seed=0) == {k: v for k, v in first.items()}
    assert len(first["test"]) == 10 and not set(first["test"]) & set(first["train"])
    assert split_ids(ids, 10, seed=1)["test"] != first["test"]
    with pytest.raises(ValueError, match="unique"):
        split_ids(["a", "a", "b"], 1)


def test_xsum_split_is_800_200_and_documents_are_cut(byte_tokenizer):
    train = load_task(TaskConfig(split="train", max_document_tokens=0), byte_tokenizer)
    test = load_task(TaskConfig(split="test", max_document_tokens=0), byte_tokenizer)
    assert len(train) + len(test) == 999  # one embedded row has an empty document
    assert len(test) in (199, 200) and not {r.id for r in train} & {r.id for r in test}
    assert all(r.prompt.startswith("Summarize the following BBC article") for r in test)
    cut = load_task(TaskConfig(split="test", max_document_tokens=40, limit=3), byte_tokenizer)
    assert [r.id for r in cut] == [r.id for r in test[:3]]
    assert all(len(r.prompt) < 120 for r in cut)  # 40 byte tokens + instruction
    assert cut_tokens(byte_tokenizer, "abcdef", 4) == "abcd" and cut_tokens(byte_tokenizer, "abc", 4) == "abc"


def test_prompt_and_response_encoding(byte_tokenizer):
    assert encode_prompt(byte_tokenizer, "hi") == [byte_tokenizer.bos_token_id, *byte_tokenizer("hi")["input_ids"]]
    assert encode_response(byte_tokenizer, "ok")[-1] == byte_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(byte_tokenizer, "hi", chat_template=True)


def test_sampling_appends_and_resumes(workspace):
    root, tokenizer = workspace
    out = root / "samples.jsonl"
    config = SampleConfig(proposal=str(root / "proposal"), out=str(out), task=task(root), max_new_tokens=5, batch_size=4)
    config.task = TaskConfig(**{**task(root).to_dict(), "limit": 4})
    first = sample_proposal(config)
    assert first["sampled"] == 4 and len(read_samples(out)) == 4
    with open(out, "a") as handle:  # a run killed mid-write leaves half a line
        handle.write('{"id": "r99", "sam')
    config.task = task(root)
    second = sample_proposal(config)
    assert second["already_done"] == 4 and second["sampled"] == 5  # 9 training prompts in all
    samples = read_samples(out)
    assert len(samples) == 9 and len(out.read_text().splitlines()) == 9
    assert all(len(s["sample_ids"]) <= 5 for s in samples.values())
    assert json.loads((root / "samples.jsonl.config.json").read_text())["config"]["decode"]["proposal_top_k"] == 10


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("loss", ["residual", "dpo"])
def test_training_from_proposal_layers_changes_weights_and_resumes_exactly(workspace, tmp_path, loss):
    root, tokenizer = workspace
    samples = root / "samples.jsonl"
    if not samples.exists():
        sample_proposal(SampleConfig(proposal=str(root / "proposal"), out=str(samples), task=task(root), max_new_tokens=5))

    def run(out, **overrides):
        settings = dict(batch_size=3, max_steps=3, save_every=1, learning_rate=1e-2) | overrides
        config = TrainConfig(out=str(out), samples=str(samples), proposal=str(root / "proposal"),
                             init_from_proposal_layers=1, task=task(root), loss=LossConfig(name=loss, alpha=0.1),
                             **settings)
        return train_aligner(config)

    summary = run(tmp_path / "a")
    assert summary["steps"] == 3
    trained = _weights(tmp_path / "a" / "aligner")
    assert json.loads((tmp_path / "a" / "aligner" / "config.json").read_text())["num_hidden_layers"] == 1
    initial = _weights(root / "proposal")
    for name, tensor in trained.items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not change"
    # resume: a run that stopped after step 2 (checkpoint kept), rerun, ends with the same weights
    run(tmp_path / "b", max_steps=None, epochs=1)  # 9 prompts / 3 = 3 steps, checkpoints at 1 and 2
    import shutil

    shutil.rmtree(tmp_path / "b" / "aligner")
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")] == ["step-000002"]
    resumed = run(tmp_path / "b", max_steps=None, epochs=1)
    assert resumed["steps"] == 3
    for name, tensor in _weights(tmp_path / "b" / "aligner").items():
        torch.testing.assert_close(tensor, trained[name])


def test_lora_training_is_merged_and_base_untouched(workspace, tmp_path):
    root, _ = workspace
    samples = root / "samples.jsonl"
    if not samples.exists():
        sample_proposal(SampleConfig(proposal=str(root / "proposal"), out=str(samples), task=task(root), max_new_tokens=5))
    before = _weights(root / "proposal")
    config = TrainConfig(out=str(tmp_path / "lora"), samples=str(samples), aligner=str(root / "proposal"), task=task(root),
                         lora=True, batch_size=4, max_steps=2, learning_rate=5e-2)
    train_aligner(config)
    merged = _weights(tmp_path / "lora" / "aligner")
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(t, _weights(root / "proposal")[n]) for n, t in before.items())
    assert not any("lora" in n for n in merged)


def test_rouge_by_hand():
    assert rouge_scores(["the cat sat"], ["the cat sat"])["rougeL"] == pytest.approx(100.0)
    scores = rouge_scores(["the cat"], ["the cat sat down"])  # P 1, R 0.5 -> F 2/3
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["mean_words"] == 2.0
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])


def test_eval_runs_every_system(workspace):
    root, _ = workspace
    config = AlignEvalConfig(proposal=str(root / "proposal"), aligner=str(root / "proposal"),
                             finetuned=str(root / "proposal"),
                             systems=["proposal", "aligner", "par", "par-kl", "sir", "mds", "finetuned"],
                             task=task(root, "test"), generate=GenerateConfig(greedy=True, max_new_tokens=4))
    results = evaluate_systems(config)
    assert results["n_prompts"] == 3
    assert set(results["systems"]) == set(config.systems)
    # aligner == proposal == finetuned here: greedy "aligner" and "finetuned" decode the same text
    assert results["systems"]["aligner"]["rougeL"] == results["systems"]["finetuned"]["rougeL"]
    with pytest.raises(ValueError, match="finetuned"):
        AlignEvalConfig(proposal="p", aligner="a", systems=["finetuned"])
