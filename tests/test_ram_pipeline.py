"""RAM data, sampling, training and evaluation on tiny random models (seconds, no embedded model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.ram.data import TaskConfig, cut_tokens, encode_prompt, encode_response, load_task, split_ids
from amendlm.ram.evaluate import AlignEvalConfig, evaluate_systems, rouge_scores
from amendlm.ram.examples import heldout_ids, sample_tokens
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
    with pytest.raises(ValueError, match=r"another configuration \(max_new_tokens, temperature;"):
        sample_proposal(SampleConfig(proposal=str(root / "proposal"), out=str(out), task=task(root), max_new_tokens=6,
                                     temperature=0.7, batch_size=2, seed=5))  # batch size and seed may change


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _samples(root):
    samples = root / "samples.jsonl"
    if not samples.exists():
        sample_proposal(SampleConfig(proposal=str(root / "proposal"), out=str(samples), task=task(root), max_new_tokens=5))
    return samples


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


@pytest.mark.parametrize("loss", ["residual", "dpo"])
def test_training_from_proposal_layers_changes_weights_and_resumes_exactly(workspace, tmp_path, monkeypatch, loss):
    from amendlm.ram import run_dir

    root, tokenizer = workspace
    samples = _samples(root)

    def run(out, **overrides):
        settings = dict(batch_size=3, max_steps=3, save_every=2, log_every=1, learning_rate=1e-2, dtype="fp32") | overrides
        config = TrainConfig(out=str(out), samples=str(samples), proposal=str(root / "proposal"),
                             init_from_proposal_layers=1, task=task(root), loss=LossConfig(name=loss, alpha=0.1),
                             **settings)
        return train_aligner(config)

    summary = run(tmp_path / "a")
    assert summary["steps"] == 3 and not summary["already_finished"]
    assert (summary["n_examples"], summary["n_heldout"]) == (8, 1)  # 9 training prompts, 5 % held out: at least 1
    assert [p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")] == ["step-000003"]  # the final step's
    trained = _weights(tmp_path / "a" / "aligner")
    assert json.loads((tmp_path / "a" / "aligner" / "config.json").read_text())["num_hidden_layers"] == 1
    initial = _weights(root / "proposal")
    for name, tensor in trained.items():
        assert not torch.equal(tensor, initial[name]), f"{name} did not change"
    log = _log(tmp_path / "a")
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3]
    # held out: before training and at the end of the (only, 3-batch) epoch, which is the final step
    assert [(r["step"], r["epoch"], r["n_examples"]) for r in log if r["event"] == "heldout"] == [(0, 0.0, 1), (3, 1.0, 1)]
    # a rerun of the finished run trains nothing and logs nothing
    again = run(tmp_path / "a")
    assert again["already_finished"] and again["steps"] == 3 and _log(tmp_path / "a") == log

    # a run killed while saving step 3 (its checkpoint at step 2 kept, step 3 already logged) resumes exactly
    save = run_dir.save_checkpoint

    def killed_at_3(accelerator, out, step, micro, extra=None):
        if step == 3:
            raise Killed()
        save(accelerator, out, step, micro, extra)

    monkeypatch.setattr(run_dir, "save_checkpoint", killed_at_3)
    with pytest.raises(Killed):
        run(tmp_path / "b")
    assert [r["step"] for r in _log(tmp_path / "b") if r["event"] == "train"] == [1, 2, 3]
    monkeypatch.setattr(run_dir, "save_checkpoint", save)
    resumed = run(tmp_path / "b")
    assert resumed["steps"] == 3 and not resumed["already_finished"]
    assert [r["step"] for r in _log(tmp_path / "b") if r["event"] == "train"] == [1, 2, 3]  # no step logged twice
    for name, tensor in _weights(tmp_path / "b" / "aligner").items():
        torch.testing.assert_close(tensor, trained[name])


def test_training_seconds_add_up_across_resumes_and_old_checkpoints_still_resume(workspace, tmp_path, monkeypatch):
    from amendlm.ram import run_dir

    root, _ = workspace
    samples = _samples(root)

    def run(out):
        return train_aligner(TrainConfig(out=str(out), samples=str(samples), proposal=str(root / "proposal"),
                                         init_from_proposal_layers=1, task=task(root), batch_size=3, max_steps=3,
                                         save_every=2, log_every=1, eval_fraction=0.0, dtype="fp32"))

    save = run_dir.save_checkpoint

    def killed_at_3(accelerator, out, step, micro, extra=None):
        if step == 3:
            raise Killed()
        save(accelerator, out, step, micro, extra)

    def interrupted(out):  # a run killed after its step-2 checkpoint; returns that checkpoint's state file
        monkeypatch.setattr(run_dir, "save_checkpoint", killed_at_3)
        with pytest.raises(Killed):
            run(out)
        monkeypatch.setattr(run_dir, "save_checkpoint", save)
        return out / "checkpoints" / "step-000002" / "trainer_state.json"

    state_file = interrupted(tmp_path / "a")
    state = json.loads(state_file.read_text())
    assert state["seconds"] > 0 and state["seconds_complete"] is True
    state_file.write_text(json.dumps({**state, "seconds": 1000.0}))  # as if the first part had trained 1000 s
    resumed = run(tmp_path / "a")
    assert resumed["steps"] == 3 and resumed["seconds_complete"] is True and 0 < resumed["seconds_this_run"] < 1000
    assert resumed["seconds"] == pytest.approx(1000.0 + resumed["seconds_this_run"])
    assert json.loads((tmp_path / "a" / "train_summary.json").read_text())["seconds"] == resumed["seconds"]
    final = json.loads((tmp_path / "a" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert 1000.0 < final["seconds"] <= resumed["seconds"]
    assert [r["seconds"] > 1000.0 for r in _log(tmp_path / "a") if r["event"] == "train"] == [False, False, True]

    state_file = interrupted(tmp_path / "b")  # a checkpoint written before checkpoints recorded seconds
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if not k.startswith("seconds")}))
    resumed = run(tmp_path / "b")
    assert resumed["steps"] == 3 and resumed["seconds_complete"] is False
    assert resumed["seconds"] == pytest.approx(resumed["seconds_this_run"])  # the earlier part counts 0
    final = json.loads((tmp_path / "b" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert final["seconds_complete"] is False


def test_seconds_before_a_resume_come_from_the_checkpoint_state():
    from amendlm.ram.run_dir import seconds_before

    assert seconds_before(None) == (0.0, True)  # no checkpoint: the run starts now
    assert seconds_before({"step": 2, "seconds": 12.5, "seconds_complete": True}) == (12.5, True)
    assert seconds_before({"step": 2, "seconds": 12.5, "seconds_complete": False}) == (12.5, False)
    assert seconds_before({"step": 2, "micro_batches": 2}) == (0.0, False)  # an older checkpoint


def test_train_refuses_bad_inputs_before_any_model_loads(workspace, tmp_path, monkeypatch):
    from amendlm.data.io import DataError
    from amendlm.ram import train

    root, _ = workspace
    samples = _samples(root)
    monkeypatch.setattr(train, "build_aligner", lambda config, device: pytest.fail("a model loaded"))

    def config(**overrides):
        settings = dict(out=str(tmp_path / "run"), samples=str(samples), proposal=str(root / "proposal"),
                        init_from_proposal_layers=1, task=task(root)) | overrides
        return TrainConfig(**settings)

    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such samples file"):
        train_aligner(config(samples=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="max_document_tokens 0 vs 7"):  # sampled with no cut
        train_aligner(config(task=TaskConfig(**{**task(root).to_dict(), "max_document_tokens": 7})))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "a", "response": "b"}\n{"id": 2, "prompt": "c"}\n')
    with pytest.raises(DataError, match="bad.jsonl row 2: missing field 'response'"):
        (tmp_path / "s.jsonl").write_text("")  # no .config.json beside: accepted as it is
        train_aligner(config(samples=str(tmp_path / "s.jsonl"), task=TaskConfig(data=str(bad), n_test=1, max_document_tokens=0)))
    with pytest.raises(FileNotFoundError, match="--aligner .*missing: no such model directory"):
        train_aligner(config(init_from_proposal_layers=None, aligner=str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()  # no empty output directory left behind
    # a run directory that holds a checkpoint refuses another configuration, naming the fields
    (tmp_path / "run" / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(
        {**dataclasses.asdict(config()), "dtype": "fp32", "dtype_auto": True}))
    with pytest.raises(ValueError, match=r"different configuration \(learning_rate, task.split_seed\)"):
        train_aligner(config(learning_rate=3e-4, task=TaskConfig(**{**task(root).to_dict(), "split_seed": 1}), save_every=7))


def test_held_out_split_is_seeded_order_free_and_bounded():
    ids = [f"r{i}" for i in range(40)]
    held = heldout_ids(ids, 0.05, seed=0)
    assert len(held) == 2 and held == heldout_ids(list(reversed(ids)), 0.05, seed=0)
    assert heldout_ids(ids, 0.05, seed=1) != held
    assert heldout_ids(ids, 0.0) == set() and len(heldout_ids(ids[:3], 0.01)) == 1 and len(heldout_ids(ids[:2], 0.9)) == 1
    with pytest.raises(ValueError, match="eval_fraction"):
        heldout_ids(ids, 1.0)


def test_a_sample_gets_eos_only_when_the_proposal_ended_it_with_eos(byte_tokenizer):
    text = byte_tokenizer("ab", add_special_tokens=False)["input_ids"]
    eos = byte_tokenizer.eos_token_id
    assert sample_tokens(byte_tokenizer, {"sample": "ab", "finish_reason": "eos"}) == [*text, eos]
    assert sample_tokens(byte_tokenizer, {"sample": "ab ", "finish_reason": "stop"}) == text  # cut at "\n": no EOS
    assert sample_tokens(byte_tokenizer, {"sample": "ab", "finish_reason": "length"}) == text


def test_held_out_loss_is_the_mean_over_examples_whatever_the_batch_size(workspace):
    from amendlm.ram.examples import build_examples, heldout_loss
    from amendlm.ram.losses import get_loss

    root, tokenizer = workspace
    examples = build_examples(task(root), str(_samples(root)), tokenizer)[:5]
    model = make_tiny_llama(len(tokenizer), seed=3)
    config = LossConfig(alpha=0.5)
    whole = heldout_loss(model, examples, get_loss("residual"), config, 2, batch_size=5)
    for batch_size in (1, 2):
        torch.testing.assert_close(heldout_loss(model, examples, get_loss("residual"), config, 2, batch_size=batch_size)["loss"],
                                   whole["loss"], rtol=1e-5, atol=1e-5)
    assert whole["loss"] == pytest.approx(whole["nll"] + 0.5 * whole["sample_logp"], rel=1e-5)


def test_sft_skips_the_proposal_samples_with_the_same_gradients(workspace, tmp_path):
    """Residual loss at alpha 0 (SFT): the y' half of the forward is skipped, the gradients are unchanged."""
    from amendlm.ram.examples import build_examples, pair_logps
    from amendlm.ram.losses import get_loss

    root, tokenizer = workspace
    examples = build_examples(task(root), str(_samples(root)), tokenizer)[:4]
    model = make_tiny_llama(len(tokenizer), seed=4)
    rows = []
    model.register_forward_hook(lambda module, args, kwargs, output: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    grads = []
    for negatives in (True, False):
        model.zero_grad()
        scores = pair_logps(model, examples, 2, negatives=negatives)
        loss, _ = get_loss("residual")(scores["positive_logps"], scores["negative_logps"], LossConfig(alpha=0.0),
                                      scores["positive_n"], scores["negative_n"])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert rows == [8, 4]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
    config = TrainConfig(out=str(tmp_path / "sft"), samples=str(_samples(root)), aligner=str(root / "proposal"), task=task(root),
                         loss=LossConfig(alpha=0.0), batch_size=4, max_steps=1)
    train_aligner(config)
    records = _log(tmp_path / "sft")
    assert any(r["event"] == "train" for r in records)
    assert all("sample_logp" not in r for r in records if r["event"] == "train")  # not computed, so not logged


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
    choices = {system: m["choices"] for system, m in results["systems"].items()}
    assert choices["par-kl"]["fallback_rate"] == 0.0  # KL(P_M || P_M) = 0: never falls back
    assert choices["par"]["fallback_rate"] is None and choices["proposal"]["follows_aligner_argmax"] is None
    assert choices["proposal"]["follows_proposal_argmax"] == 1.0 and choices["mds"]["follows_aligner_argmax"] == 1.0
    assert all(c["token_steps"] >= 3 for c in choices.values())
    with pytest.raises(ValueError, match="finetuned"):
        AlignEvalConfig(proposal="p", aligner="a", systems=["finetuned"])


def test_distillation_warm_up_moves_the_cut_aligner_towards_the_proposal(workspace, tmp_path):
    from amendlm.modeling import load_model
    from amendlm.ram.distill import DistillConfig, distill_aligner
    from amendlm.ram.losses import token_kl
    from amendlm.ram.train import truncate_to_layers

    root, tokenizer = workspace
    config = DistillConfig(out=str(tmp_path / "warm"), proposal=str(root / "proposal"), layers=1, task=task(root),
                           steps=8, batch_size=9, learning_rate=2e-3, max_tokens=16, dtype="fp32")
    summary = distill_aligner(config)
    assert summary["steps"] == 8 and not summary["already_finished"]
    saved = json.loads((tmp_path / "warm" / "aligner" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1
    assert json.loads((tmp_path / "warm" / "distill_config.json").read_text())["n_texts"] == 8  # 9 training documents, 1 held out
    assert distill_aligner(config)["already_finished"]

    proposal, _ = load_model(str(root / "proposal"))
    cut = truncate_to_layers(load_model(str(root / "proposal"))[0], 1)
    warmed, _ = load_model(str(tmp_path / "warm" / "aligner"))
    ids = torch.tensor([[0, *tokenizer(f"story {i}: the cat sat", add_special_tokens=False)["input_ids"]] for i in range(3)])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        teacher = proposal(ids).logits.log_softmax(-1)
        before = token_kl(teacher, cut(ids).logits.log_softmax(-1), mask).item()
        after = token_kl(teacher, warmed(ids).logits.log_softmax(-1), mask).item()
    assert after < before  # KL(P_M || Q) per position on the training documents, nats


def test_truncate_log_keeps_records_up_to_the_checkpoint_and_nothing_without_one(tmp_path):
    import json as _json

    from amendlm.ram import run_dir

    log = tmp_path / "train_log.jsonl"
    lines = [_json.dumps({"event": "heldout", "step": 0}), _json.dumps({"event": "train", "step": 1}),
             _json.dumps({"event": "train", "step": 2})]
    log.write_text("\n".join(lines) + '\n{"event": "tra')  # a half-written last line
    run_dir.truncate_log(log, 1)
    assert log.read_text().splitlines() == lines[:2]
    run_dir.truncate_log(log, None)  # no checkpoint: a fresh run, perhaps configured otherwise, keeps nothing
    assert log.read_text() == ""
