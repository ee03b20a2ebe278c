"""The unlearning loop on a tiny random Llama: LoRA, checkpoint + resume, NaN stop, registry."""

import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.data.stereoset import StereoSetCluster
from amendlm.unlearn import artifacts
from amendlm.unlearn.config import UnlearnConfig
from amendlm.unlearn.methods import METHODS, get_method
from amendlm.unlearn.trainer import UnlearnTrainer, lora_target_modules, learning_rate, TrainState


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class CharTokenizer:
    """Characters as tokens (ids 3..130); bos 1, eos 2, pad 0 — enough for the scorer."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 1, 2, 0, None
    bos_token, eos_token, unk_token = "<s>", "</s>", None

    def _ids(self, text):
        return [3 + (ord(ch) % 128) for ch in text]

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def tiny_model(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **overrides)
    return LlamaForCausalLM(config)


def toy_clusters():
    words = [("kind", "rude", "fork"), ("smart", "dull", "blue")]
    clusters = []
    for b, bias_type in enumerate(("gender", "race")):
        for t in range(5):
            for k in range(2):
                s, a, u = words[(t + k) % 2]
                clusters.append(StereoSetCluster(f"toy:{b}{t}{k}", "intrasentence", f"{bias_type}{t}", bias_type,
                                                 f"The t{t} is BLANK.", f"The t{t} is {s}.", f"The t{t} is {a}.", f"The t{t} is {u}."))
    return clusters


def make_trainer(tmp_path, model=None, **overrides):
    options = dict(out=str(tmp_path / "run"), model="tiny", max_steps=3, batch_size=2, lr=1e-2, checkpoint_every=1,
                   val_clusters=None, schedule_scale=0.05, kl_text_limit=None, kl_chunk_tokens=8, seed=1)
    options.update(overrides)
    config = UnlearnConfig(**options)
    return UnlearnTrainer(config, model or tiny_model(), CharTokenizer(), toy_clusters(), ["general text for the KL set."])


def interrupt_at(trainer, at_step: int):
    """Make ``trainer`` raise KeyboardInterrupt (Ctrl-C) at the start of the step after ``at_step``."""
    step = trainer.train_step

    def interrupted(log):
        if trainer.state.step == at_step:
            raise KeyboardInterrupt
        step(log)

    trainer.train_step = interrupted
    return trainer


def test_lora_targets_are_detected_for_llama():
    assert lora_target_modules(tiny_model()) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_two_lora_steps_change_the_adapter_and_not_the_base(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train()
    assert result.status in ("completed", "stopped") and result.steps >= 1
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b and lora_b <= changed  # every LoRA B matrix moved away from its zero init
    assert all("lora_" in n for n in changed)  # nothing of the base model did
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "unlearn_config.json").read_text())["method"] == "biasunlearn"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "eval" and records[0]["step"] == 0 and "decision" in records[0]
    assert {"loss", "forget", "retain", "kl", "lr"} <= set(records[1])
    assert (out / "ss_per_type.png").stat().st_size > 0


def test_first_step_npo_equals_two_over_beta_ln2(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, lora_dropout=0.0)
    trainer.train()
    first = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][1]
    assert first["forget"] == pytest.approx(2 / 0.1 * 0.6931471805599453, rel=1e-5)  # adapter B = 0: policy = reference
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["biasunlearn", "dpo"])
def test_interrupt_then_resume_ends_in_the_same_weights(tmp_path, method):
    common = dict(method=method, keep_best=False, max_steps=3)
    full = make_trainer(tmp_path / "a", **common)
    full.train()
    reference = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))

    first = make_trainer(tmp_path / "b", **common)
    interrupt_at(first, 2)
    assert first.train().status == "interrupted"
    assert json.loads((tmp_path / "b" / "run" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = make_trainer(tmp_path / "b", **common)
    result = resumed.train(resume=True)
    assert result.steps == 3 and result.status == "completed"
    weights = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-7)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3]


def _interrupted_at_step_2(tmp_path, **common):
    first = make_trainer(tmp_path, **common)
    interrupt_at(first, 2)
    result = first.train()
    assert result.status == "interrupted" and result.seconds_complete
    assert result.seconds == pytest.approx(result.seconds_this_run)  # a first part is the whole run so far
    return result, tmp_path / "run" / "checkpoint" / "state.json"


def test_training_seconds_add_up_across_a_resume(tmp_path):
    common = dict(method="sft-anti", keep_best=False, eval_every=0, max_steps=3)
    first, state_file = _interrupted_at_step_2(tmp_path, **common)
    state = json.loads(state_file.read_text())
    assert 0 < state["seconds"] <= first.seconds and state["seconds_complete"] is True
    state["seconds"] = 1000.0  # as if the first part had trained for 1000 s: the resumed total must carry it
    state_file.write_text(json.dumps(state))
    resumed = make_trainer(tmp_path, **common).train(resume=True)
    assert resumed.steps == 3 and resumed.seconds_complete
    assert 0 < resumed.seconds_this_run < 1000
    assert resumed.seconds == pytest.approx(1000.0 + resumed.seconds_this_run)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["seconds"] == resumed.seconds and summary["seconds_this_run"] == resumed.seconds_this_run
    assert json.loads(state_file.read_text())["seconds"] >= 1000.0  # the final checkpoint's running total


def test_a_checkpoint_without_seconds_resumes_and_says_the_total_is_incomplete(tmp_path):
    common = dict(method="sft-anti", keep_best=False, eval_every=0, max_steps=3)
    _, state_file = _interrupted_at_step_2(tmp_path, **common)
    state = json.loads(state_file.read_text())
    del state["seconds"], state["seconds_complete"]  # as written before checkpoints recorded seconds
    state_file.write_text(json.dumps(state))
    resumed = make_trainer(tmp_path, **common).train(resume=True)
    assert resumed.steps == 3 and resumed.seconds_complete is False
    assert resumed.seconds == pytest.approx(resumed.seconds_this_run)  # the earlier part counts 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["seconds_complete"] is False
    assert json.loads(state_file.read_text())["seconds_complete"] is False  # and stays so in later checkpoints


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    make_trainer(tmp_path, max_steps=1).train()
    run = next(p for p in tmp_path.rglob("unlearn_config.json")).parent
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match="--resume"):
        make_trainer(tmp_path, max_steps=1).train()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_run_that_died_before_its_first_checkpoint_can_start_afresh(tmp_path):
    from amendlm.unlearn.trainer import check_run_directory

    (tmp_path / "unlearn_config.json").write_text("{}")
    (tmp_path / "log.jsonl").write_text("")
    check_run_directory(tmp_path, resume=False)  # nothing to lose: no checkpoint, no weights
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        check_run_directory(tmp_path, resume=True)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="adapter_model.safetensors"):
        check_run_directory(tmp_path, resume=False)


def test_check_resume_config_names_the_differing_options(tmp_path):
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.trainer import check_resume_config

    saved = UnlearnConfig(out=str(tmp_path), lr=1e-4, dtype="bf16").to_dict()
    (tmp_path / "unlearn_config.json").write_text(json.dumps({**saved, "dtype_auto": True}))
    check_resume_config(UnlearnConfig(out=str(tmp_path), lr=1e-4, dtype="auto", max_steps=999), resume=True)
    check_resume_config(UnlearnConfig(out=str(tmp_path), lr=5e-4), resume=False)  # not resuming: no check
    # where it trains is not what it trains: another device (or --cpu) may resume the run
    check_resume_config(UnlearnConfig(out=str(tmp_path), lr=1e-4, dtype="bf16", device="cpu"), resume=True)
    check_resume_config(UnlearnConfig(out=str(tmp_path), lr=1e-4, dtype="bf16", cpu=True), resume=True)
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        check_resume_config(UnlearnConfig(out=str(tmp_path), lr=5e-4, dtype="bf16"), resume=True)
    with pytest.raises(ValueError, match="dtype"):
        check_resume_config(UnlearnConfig(out=str(tmp_path), lr=1e-4, dtype="fp32"), resume=True)


def test_resume_refuses_a_different_configuration(tmp_path):
    make_trainer(tmp_path, max_steps=1).train()
    with pytest.raises(ValueError, match="different configuration"):
        make_trainer(tmp_path, max_steps=2, lr=5e-3).train(resume=True)


def test_dtype_auto_is_saved_resolved_and_resumes(tmp_path, monkeypatch):
    from amendlm import modeling

    monkeypatch.setattr(modeling, "cpu_bf16_speedup", lambda: 1.0)  # this "CPU" has no fast bf16: auto is fp32
    modeling.cpu_bf16_is_fast.cache_clear()
    try:
        make_trainer(tmp_path, max_steps=1, dtype="auto").train()
        saved = json.loads((tmp_path / "run" / "unlearn_config.json").read_text())
        assert (saved["dtype"], saved["dtype_auto"]) == ("fp32", True)
        assert UnlearnConfig.load(tmp_path / "run" / "unlearn_config.json").dtype == "fp32"
        # auto resolved alike and an explicit fp32 both match the saved run
        assert make_trainer(tmp_path, max_steps=2, dtype="auto").train(resume=True).steps == 2
        assert make_trainer(tmp_path, max_steps=2, dtype="fp32").train(resume=True).steps == 2
        with pytest.raises(ValueError, match="different configuration"):
            make_trainer(tmp_path, max_steps=2, dtype="bf16").train(resume=True)
    finally:
        modeling.cpu_bf16_is_fast.cache_clear()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=4, method="sft-anti", keep_best=False, eval_every=0)
    original = trainer.method.loss
    calls = {"n": 0}

    def flaky(outputs, weights):
        calls["n"] += 1
        loss, parts = original(outputs, weights)
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(trainer, "method", type(trainer.method)(**{**trainer.method.__dict__, "loss": flaky}))
    result = trainer.train()
    assert result.status == "nan" and result.steps == 2
    checkpoint = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert checkpoint["step"] == 2
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_every_method_runs_one_step(tmp_path):
    for name in METHODS:
        result = make_trainer(tmp_path / name, method=name, max_steps=1, val_clusters=4).train()
        assert result.steps == 1, name


def test_registry_and_config_errors_list_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid: biasunlearn, npo, gradascent, graddiff, dpo, sft-anti"):
        get_method("unlearn-everything")
    with pytest.raises(ValueError, match="reference='copy'"):
        UnlearnConfig(out=str(tmp_path), finetune="full")
    with pytest.raises(ValueError, match="batch_size"):
        UnlearnConfig(out=str(tmp_path), batch_size=0)


def test_learning_rate_warms_up_and_decays_linearly(tmp_path):
    config = UnlearnConfig(out=str(tmp_path), lr=1.0, warmup_steps=2, max_steps=10)
    state = TrainState(phase_start=0, phase_steps=10)
    assert [round(learning_rate(config, state, s), 3) for s in (0, 1, 5, 10)] == [0.5, 0.9, 0.5, 0.0]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(97 + i): 4 + i for i in range(26)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_merged_model_matches_base_plus_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from amendlm.modeling import load_model
    from amendlm.unlearn.artifacts import merge_adapter

    base_dir = tmp_path / "base"
    tiny_model().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    trainer = make_trainer(tmp_path, max_steps=2, method="sft-anti", keep_best=False, eval_every=0)
    trainer.train()
    adapter = tmp_path / "run"

    merged_dir = merge_adapter(str(base_dir), adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with_adapter, _ = load_model(str(base_dir), adapter=adapter)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    base, _ = load_model(str(base_dir))
    with torch.no_grad():
        expected = with_adapter(ids).logits
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)  # the adapter did something
    with pytest.raises(FileExistsError):
        merge_adapter(str(base_dir), adapter, merged_dir)


def test_full_finetuning_uses_a_frozen_reference_copy(tmp_path):
    trainer = make_trainer(tmp_path, finetune="full", reference="copy", max_steps=2, keep_best=False, eval_every=0)
    frozen = {n: p.detach().clone() for n, p in trainer.reference_model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.reference_model.named_parameters())
    assert any(not torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    # policy = reference at step 1, so the NPO log-ratio is ~0 and the loss (2/beta) log 2; the
    # tolerance (log-ratio within ~1e-3 nats) allows for the grad / no-grad attention kernels
    # summing in a different order (seen with one OpenMP thread: 13.86253 vs 13.86294)
    assert first["forget"] == pytest.approx(2 / 0.1 * 0.6931471805599453, abs=2e-3)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_full_weights_of_a_tied_model_save_and_reload_with_the_same_logits(tmp_path):
    """SmolLM2 / Gemma 3 tie lm_head to the embeddings: one name is saved, loading restores both."""
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)  # differs from a fresh model's
    artifacts.save_weights(tmp_path / "best", model)
    artifacts.save_checkpoint(tmp_path / "checkpoint", model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 0})
    ids = torch.tensor([[5, 9, 17, 30]])
    with torch.no_grad():
        expected = model(ids).logits
    for load in (lambda m: artifacts.load_weights(tmp_path / "best", m),
                 lambda m: artifacts.load_checkpoint(tmp_path / "checkpoint", m, None)):
        fresh = tiny_model(seed=3, tie_word_embeddings=True)
        load(fresh)
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
        with torch.no_grad():
            torch.testing.assert_close(fresh(ids).logits, expected)


def test_full_finetuning_of_a_tied_model_keeps_its_best_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, model=tiny_model(tie_word_embeddings=True), finetune="full", reference="copy",
                           max_steps=2, eval_every=1, keep_best=True)
    result = trainer.train()
    assert result.status in ("completed", "stopped") and result.best_step is not None
    assert (tmp_path / "run" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weights_saved"].startswith("best")


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    import os
    import signal

    trainer = make_trainer(tmp_path, max_steps=4, method="sft-anti", eval_every=0)
    step = trainer.train_step

    def terminated(log):
        if trainer.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        step(log)

    trainer.train_step = terminated
    previous = signal.getsignal(signal.SIGTERM)
    result = trainer.train()
    assert result.status == "interrupted" and result.steps == 1
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 1
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
