"""The reference pass on a tiny random GPT-2 *with dropout*: frozen means deterministic.

GPT-2 (like OPT and Phi) has residual, embedding and attention dropout, and LoRA adds its own.
A reference pass run while the model is in train mode would draw fresh dropout masks, so the
"frozen" reference would differ from call to call and KL would not be 0 at step 1.
"""

import pytest
import torch

from amendlm.unlearn.config import UnlearnConfig
from amendlm.unlearn.losses import kl_loss
from amendlm.unlearn.models import attach_lora, eval_mode, frozen_copy, lora_target_modules, reference_logits


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_layer=2, n_embd=32, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(config)


def batch(tokenizer):
    texts = ["The nurse was very caring.", "A short one."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.fixture()
def policy(byte_tokenizer, tmp_path):
    """The policy as the trainer holds it: LoRA (dropout 0.1) on GPT-2, in train mode."""
    config = UnlearnConfig(out=str(tmp_path), lora_dropout=0.1)
    model = attach_lora(tiny_gpt2(len(byte_tokenizer)), config)
    model.train()
    return model


def test_gpt2_lora_targets_are_its_conv1d_projections(byte_tokenizer):
    assert lora_target_modules(tiny_gpt2(len(byte_tokenizer))) == ["c_attn", "c_fc", "c_proj"]


def test_the_adapter_reference_is_deterministic_and_equals_the_policy_in_eval_mode(policy, byte_tokenizer):
    inputs = batch(byte_tokenizer)
    first = reference_logits(policy, inputs, torch.float32)
    second = reference_logits(policy, inputs, torch.float32)
    assert torch.equal(first, second)  # no dropout mask was drawn
    # the policy itself is still training: two train-mode passes differ (dropout is really on)
    with torch.no_grad():
        assert not torch.equal(policy(**inputs).logits, policy(**inputs).logits)
    # at LoRA init (B = 0) the policy without dropout *is* the reference: KL exactly 0
    with torch.no_grad(), eval_mode(policy):
        policy_logits = policy(**inputs, use_cache=False).logits
    assert kl_loss(policy_logits, first, inputs["attention_mask"]).item() == 0.0


def test_the_reference_pass_restores_every_module_mode(policy, byte_tokenizer):
    inputs = batch(byte_tokenizer)
    head = policy.get_output_embeddings()
    head.eval()  # a submodule the caller keeps in eval mode stays there
    before = {name: module.training for name, module in policy.named_modules()}
    assert any(before.values()) and not all(before.values())
    reference_logits(policy, inputs, torch.float32)
    assert {name: module.training for name, module in policy.named_modules()} == before


def test_the_reference_pass_restores_modes_and_adapter_after_an_exception(policy, byte_tokenizer):
    inputs = batch(byte_tokenizer)
    with torch.no_grad():  # make the adapter do something, so "enabled" is visible in the logits
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    with torch.no_grad(), eval_mode(policy):
        adapted = policy(**inputs).logits

    def fail(module, args):
        raise RuntimeError("boom")

    hook = policy.get_output_embeddings().register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        reference_logits(policy, inputs, torch.float32)
    hook.remove()
    assert all(module.training for module in policy.modules())
    with torch.no_grad(), eval_mode(policy):
        assert torch.equal(policy(**inputs).logits, adapted)  # adapter enabled again


def test_a_copy_reference_runs_without_dropout_and_keeps_its_mode(byte_tokenizer):
    inputs = batch(byte_tokenizer)
    reference = frozen_copy(tiny_gpt2(len(byte_tokenizer)))
    reference.train()  # even a copy someone switched to train mode is run without dropout
    first = reference_logits(None, inputs, torch.float32, reference_model=reference)
    assert torch.equal(first, reference_logits(None, inputs, torch.float32, reference_model=reference))
    assert reference.training
    with torch.no_grad():
        expected = reference.eval()(**inputs).logits
    assert torch.equal(first, expected)


def test_the_trainer_reference_pass_is_free_of_dropout(tmp_path):
    """GPT-2 has dropout (and LoRA adds its own): the trainer's reference must not be random."""
    from amendlm.scoring import collate
    from amendlm.unlearn.trainer import UnlearnTrainer
    from tests.test_unlearn_trainer import CharTokenizer, toy_clusters

    config = UnlearnConfig(out=str(tmp_path / "run"), model="tiny", batch_size=2, val_clusters=None,
                           kl_chunk_tokens=8, seed=1, lora_dropout=0.1)
    trainer = UnlearnTrainer(config, tiny_gpt2(131), CharTokenizer(), toy_clusters(), ["general text for the KL set."])
    inputs = collate(trainer._next_batches()["kl"], trainer.pad_id)
    inputs.pop("loss_mask")
    assert trainer.model.training
    assert torch.equal(trainer.passes.reference_logits(inputs), trainer.passes.reference_logits(inputs))
    assert all(module.training for module in trainer.model.modules())  # the policy still trains


def test_attention_only_lora_leaves_gpt2s_mlp_c_proj_alone(byte_tokenizer, tmp_path):
    from amendlm.unlearn.models import attention_target_modules
    from tests.test_unlearn_trainer import tiny_model

    gpt2 = tiny_gpt2(len(byte_tokenizer))
    assert attention_target_modules(gpt2) == ["attn.c_attn", "attn.c_proj"]
    assert attention_target_modules(tiny_model()) == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    adapted = attach_lora(gpt2, UnlearnConfig(out=str(tmp_path), lora_scope="attention"))
    wrapped = {name.split(".base_layer")[0] for name, _ in adapted.named_modules() if name.endswith(".base_layer")}
    assert wrapped and all(".attn." in name for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"c_attn", "c_proj"}  # attn.c_proj yes, mlp.c_proj no
