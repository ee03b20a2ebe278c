"""Packed training rows and the reference cache give the padded passes' losses and gradients.

The layout is checked by hand on two tiny examples; then on tiny random models (Llama with sdpa
and eager attention, GPT-2 without dropout) the packed step must reproduce the padded one for
every method: the same losses and the same LoRA gradients up to float rounding.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.scoring import EncodedPair
from amendlm.unlearn.forward import pair_groups
from amendlm.unlearn.methods import METHODS
from amendlm.unlearn.packing import pack_examples, padded_layout, scored_positions
from amendlm.unlearn.reference_cache import ReferenceCache, example_key
from amendlm.unlearn.streams import MaskedPair
from tests.test_unlearn_trainer import CharTokenizer, interrupt_at, make_trainer, tiny_model, toy_clusters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MIN = torch.finfo(torch.float32).min


def test_two_examples_share_a_row_and_never_see_each_other():
    a, b = EncodedPair([1, 5, 6], 2), EncodedPair([1, 7], 1)
    layout = pack_examples([a, b], pad_id=0, row_tokens=8)
    assert layout.inputs["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert layout.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    allowed = (layout.inputs["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert set(layout.inputs["attention_mask"].unique().tolist()) == {0.0, MIN}
    # token 5 and 6 of a are predicted at columns 0 and 1, token 7 of b at column 3
    assert (layout.rows.tolist(), layout.cols.tolist(), layout.targets.tolist(), layout.owner.tolist()) == (
        [0, 0, 0], [0, 1, 3], [5, 6, 7], [0, 0, 1])
    assert layout.n_tokens().tolist() == [2, 1]
    # a budget of 3 tokens: one row each, the shorter one padded; a padding position sees itself only
    split = pack_examples([b, a], pad_id=0, row_tokens=3)
    assert split.inputs["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert (split.inputs["attention_mask"][1, 0] == 0).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert (split.rows.tolist(), split.cols.tolist(), split.owner.tolist()) == ([1, 0, 0], [0, 0, 1], [0, 1, 1])


def test_a_dpo_pair_lays_its_shared_context_down_once():
    chosen, rejected = EncodedPair([1, 5, 6, 8], 2), EncodedPair([1, 5, 7], 1)
    layout = pack_examples([chosen, rejected], pad_id=0, groups=[[0, 1]])
    assert layout.inputs["input_ids"].tolist() == [[1, 5, 6, 8, 7]]
    assert layout.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    allowed = (layout.inputs["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1]  # rejected's " 7" sees the shared context and itself, not chosen's tokens
    assert allowed[3] == [1, 1, 1, 1, 0]
    assert layout.cols.tolist() == [1, 2, 1] and layout.targets.tolist() == [6, 8, 7]
    assert pair_groups([("chosen", 0), ("chosen", 1), ("rejected", 0), ("kl", 0), ("rejected", 1)]) == [[0, 2], [1, 4], [3]]
    with pytest.raises(ValueError, match="exactly once"):
        pack_examples([chosen, rejected], pad_id=0, groups=[[0]])


def test_masked_tokens_are_not_scored():
    item = MaskedPair([1, 4, 5, 6, 7], 3, (False, True, False))
    assert scored_positions(item) == [3]
    assert pack_examples([item], 0).targets.tolist() == [6] == padded_layout([item], 0).targets.tolist()


def tiny_gpt2(vocab_size=131):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=128, n_layer=2, n_embd=32, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.parametrize("model", ["llama-sdpa", "llama-eager", "gpt2"])
def test_packed_rows_give_every_example_its_own_logits(model):
    net = tiny_gpt2() if model == "gpt2" else tiny_model()
    if model != "gpt2":
        net.config._attn_implementation = model.split("-")[1]
    net.eval()
    torch.manual_seed(1)
    examples = [EncodedPair([1, *torch.randint(3, 131, (n,)).tolist()], k) for n, k in [(5, 2), (11, 4), (3, 3), (20, 7), (7, 1)]]
    examples.append(EncodedPair(examples[1].ids[:6] + [9, 10], 2))  # shares a prefix with example 1
    groups = [[0], [1, 5], [2], [3], [4]]
    padded = padded_layout(examples, 0)
    with torch.no_grad():
        expected = padded.scored(net(**padded.inputs).logits)
        for row_tokens in (8, 256):
            layout = pack_examples(examples, 0, groups, row_tokens)
            assert torch.equal(layout.targets, padded.targets) and torch.equal(layout.owner, padded.owner)
            torch.testing.assert_close(layout.scored(net(**layout.inputs).logits), expected, rtol=1e-5, atol=1e-5)


def trainer_pair(tmp_path, model_factory=tiny_model, **options):
    """The same run padded and packed: LoRA without dropout, its B matrices random (policy != reference)."""
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.trainer import UnlearnTrainer

    trainers = []
    for packing in (False, True):
        settings = {**dict(out=str(tmp_path / str(packing) / "run"), model="tiny", max_steps=3, batch_size=3, lr=1e-2,
                           checkpoint_every=1, val_clusters=None, schedule_scale=0.05, kl_text_limit=None,
                           kl_chunk_tokens=8, seed=1, lora_dropout=0.0), **options, "packing": packing}
        trainer = UnlearnTrainer(UnlearnConfig(**settings), model_factory(), CharTokenizer(), toy_clusters(),
                                 ["general text for the KL set, long enough for two chunks."])
        torch.manual_seed(5)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.1)
        trainers.append(trainer)
    return trainers


def loss_and_gradients(trainer):
    outputs, _ = trainer.passes.global_outputs(trainer._next_batches())
    loss, parts = trainer.method.loss(outputs, trainer.config.loss_weights())
    trainer.model.zero_grad()
    loss.backward()
    return loss.detach(), parts, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(METHODS))
def test_packed_and_padded_steps_give_the_same_losses_and_gradients(tmp_path, method):
    padded, packed = trainer_pair(tmp_path, method=method)
    assert packed.passes.packed and not padded.passes.packed and padded.passes.cache is None
    for _ in range(2):  # the second step also uses the reference log-probs cached by the first
        loss, parts, grads = loss_and_gradients(padded)
        packed_loss, packed_parts, packed_grads = loss_and_gradients(packed)
        torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
        assert parts.keys() == packed_parts.keys()
        for name in parts:
            torch.testing.assert_close(packed_parts[name], parts[name], rtol=1e-5, atol=1e-6)
        assert grads.keys() == packed_grads.keys() and any(g.abs().max() > 0 for g in grads.values())
        for name in grads:
            torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    assert packed.passes.head_only  # the output head ran on the scored positions only


def test_a_head_not_called_as_expected_gets_the_full_logits(tmp_path):
    _, packed = trainer_pair(tmp_path, method="sft-anti")
    owner = torch.nn.Module()
    owner.head = torch.nn.Linear(4, 6)
    owner.get_output_embeddings = lambda: owner.head
    examples = [EncodedPair([1, 5, 6], 2), EncodedPair([1, 7, 8, 9], 2), EncodedPair([1, 5, 9], 2)]
    layout = pack_examples(examples, 0, [[0, 2], [1]])
    hidden = torch.randn(*layout.inputs["input_ids"].shape, 4)
    expected = layout.scored(owner.head(hidden))
    torch.testing.assert_close(packed.passes.scored_logits(lambda inputs: owner.head(hidden), layout, owner), expected)
    assert packed.passes.head_only
    doubled = packed.passes.scored_logits(lambda inputs: torch.cat([owner.head(hidden)] * 2), layout, owner)
    torch.testing.assert_close(doubled, expected)  # an unexpected head output: run again with the full head
    assert not packed.passes.head_only
    packed.passes.head_only = True
    full = owner.head(hidden).detach()
    torch.testing.assert_close(packed.passes.scored_logits(lambda inputs: full, layout, owner), expected)  # never called
    assert not packed.passes.head_only


@pytest.mark.parametrize("method", ["biasunlearn", "dpo-swap"])
def test_gpt2_packed_losses_and_gradients_agree(tmp_path, method):
    padded, packed = trainer_pair(tmp_path, model_factory=tiny_gpt2, method=method)
    loss, _, grads = loss_and_gradients(padded)
    packed_loss, _, packed_grads = loss_and_gradients(packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-5, atol=1e-6)
    assert packed.passes.head_only


def test_cached_reference_log_probs_equal_fresh_ones_and_skip_the_pass(tmp_path):
    from amendlm.scoring import sequence_logps
    from amendlm.unlearn.streams import collate_stream

    _, packed = trainer_pair(tmp_path, method="npo", batch_size=4)
    batches = packed._next_batches()
    packed.passes.global_outputs(batches)
    cache = packed.passes.cache
    assert len(cache) == len({example_key(e) for e in batches["forget"]}) > 0
    for item, cached in zip(batches["forget"], cache.lookup(batches["forget"])):
        inputs = collate_stream([item], packed.pad_id)
        mask = inputs.pop("loss_mask")
        fresh = sequence_logps(packed.passes.reference_logits(inputs), inputs["input_ids"], mask)[0]
        assert cached == pytest.approx(float(fresh), rel=1e-6, abs=1e-5)
    calls = []
    original = packed.passes.reference_logits
    packed.passes.reference_logits = lambda inputs: calls.append(inputs) or original(inputs)
    outputs, _ = packed.passes.global_outputs(batches)  # the same examples again: npo needs no reference pass
    assert calls == [] and torch.equal(outputs["forget"].reference_logps, torch.tensor(cache.lookup(batches["forget"])))


def test_the_cache_is_bounded_and_round_trips():
    cache = ReferenceCache(capacity=2)
    items = [EncodedPair([1, i, i + 1], 1) for i in range(3, 6)]
    cache.store(items, [-1.5, -2.25, -3.0])
    assert cache.lookup(items) == [None, -2.25, -3.0]  # the oldest was dropped
    again = ReferenceCache(capacity=2)
    again.load_state_dict(json.loads(json.dumps(cache.state_dict())))
    assert again.lookup(items) == cache.lookup(items)
    # the same tokens scored on other positions are another example
    assert example_key(EncodedPair([1, 3, 4], 1)) != example_key(EncodedPair([1, 3, 4], 2))
    assert example_key(MaskedPair([1, 3, 4], 2, (True, False))) != example_key(EncodedPair([1, 3, 4], 2))


def test_a_packed_run_resumed_after_an_interrupt_ends_in_the_same_weights(tmp_path):
    common = dict(method="biasunlearn", keep_best=False, max_steps=4, packing=True, batch_size=4, lora_dropout=0.0)
    make_trainer(tmp_path / "a", **common).train()
    reference = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    first = make_trainer(tmp_path / "b", **common)
    interrupt_at(first, 2)
    assert first.train().status == "interrupted"
    saved = json.loads((tmp_path / "b" / "run" / "checkpoint" / "state.json").read_text())
    assert saved["step"] == 2 and len(saved["reference_cache"]) > 0
    resumed = make_trainer(tmp_path / "b", **common)
    assert resumed.train(resume=True).steps == 4
    assert resumed.passes.cache.hits > 0  # the resumed steps did use values cached before the interrupt
    summary = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert summary["packing"] == {"packed_rows": True, "fallback": None}
    weights = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-7)


def test_a_kernel_without_custom_masks_falls_back_to_padding_and_says_why(tmp_path):
    def flash():
        model = tiny_model()
        model.config._attn_implementation = "flash_attention_2"
        return model

    padded, fallback = trainer_pair(tmp_path, model_factory=flash, method="biasunlearn")
    assert not fallback.passes.packed and "flash_attention_2" in fallback.passes.fallback
    assert fallback.passes.cache is not None  # the reference log-probs are still cached
    for trainer in (padded, fallback):  # run the padded batches on a kernel this machine has
        trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation = "sdpa"
    loss, _, grads = loss_and_gradients(padded)
    fallback_loss, _, fallback_grads = loss_and_gradients(fallback)
    torch.testing.assert_close(fallback_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(fallback_grads[name], grads[name], rtol=1e-5, atol=1e-6)


def test_packing_is_refused_where_an_example_exceeds_a_sliding_window():
    """Sliding-window layers take the block mask as given (no window): packed rows are refused when the
    longest example exceeds the window, and allowed where it cannot (or the model has no window)."""
    from types import SimpleNamespace

    from amendlm.unlearn.packing import packing_unsupported

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", **config))

    gemma = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    assert "sliding window (4)" in packing_unsupported(model(**gemma), max_tokens=128)
    assert packing_unsupported(model(**gemma), max_tokens=None) is not None  # unknown length: refused
    assert packing_unsupported(model(**{**gemma, "sliding_window": 512}), max_tokens=128) is None
    assert packing_unsupported(model(sliding_window=8, use_sliding_window=False), max_tokens=128) is None
    assert packing_unsupported(model(sliding_window=None), max_tokens=128) is None
    assert packing_unsupported(model(), max_tokens=None) is None  # no window (Llama, SmolLM2)
