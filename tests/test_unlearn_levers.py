"""Levers of the default recipe: loss only on the tokens where stereotype and anti-stereotype differ.

(The per-token normalised NPO, ``npo_reduction="token_mean"``, is checked by hand in
``test_unlearn_losses.py``.)
"""

import pytest

from amendlm.data.stereoset import StereoSetCluster
from amendlm.unlearn.data import build_sets, differing_tokens
from amendlm.unlearn.streams import MaskedPair, collate_stream, encode_examples, encode_streams
from tests.test_unlearn_trainer import make_trainer

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "My", "cousin", "works", "in", "a", "hospital", ".", "She", "is",
         "nurse", "doctor", "kind", "The", "Cats", "drink", "milk"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per word or punctuation mark (spaces dropped), so the toy pair's tokens are readable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def nurse_cluster() -> StereoSetCluster:
    return StereoSetCluster("toy:0", "intersentence", "cousin", "gender", "My cousin works in a hospital.",
                            "She is a nurse.", "She is a doctor.", "Cats drink milk.")


def test_differing_tokens_are_aligned_from_both_ends_of_the_continuation():
    she, is_, a, nurse, doctor, kind, dot = 11, 12, 8, 13, 14, 15, 10
    assert differing_tokens([she, is_, a, nurse, dot], [she, is_, a, doctor, dot]) == (False, False, False, True, False)
    # a longer side keeps its extra tokens; an empty counterpart shares nothing
    # different lengths: the shared final "." is still shared
    assert differing_tokens([she, is_, a, kind, doctor, dot], [she, is_, a, nurse, dot]) == (False, False, False, True, True, False)
    assert differing_tokens([5, 6, 7], [5, 9, 10, 7]) == (False, True, False)
    assert differing_tokens([5, 5, 5], [5, 5]) == (False, False, True)  # prefix and suffix never overlap
    assert differing_tokens([5, 6], [5, 6]) == (False, False)
    assert differing_tokens([she, dot], []) == (True, True)


def test_only_nurse_and_doctor_count_in_the_toy_pair(word_tokenizer):
    sets = build_sets([nurse_cluster()], adversarial_fraction=0.0)
    forget, retain = sets.forget[0], sets.retain[0]
    assert (forget.continuation, forget.counterpart) == (" She is a nurse.", ("My cousin works in a hospital.", " She is a doctor."))
    [masked] = encode_examples(word_tokenizer, [forget], max_length=64, differing=True)
    assert isinstance(masked, MaskedPair) and masked.kept == (False, False, False, True, False)
    [plain] = encode_examples(word_tokenizer, [forget], max_length=64)
    assert not isinstance(plain, MaskedPair) and plain.ids == masked.ids
    inputs = collate_stream([masked, *encode_examples(word_tokenizer, [retain], 64, differing=True)], pad_id=0)
    scored = [[WORDS[t] for t, m in zip(ids, mask) if m] for ids, mask in zip(inputs["input_ids"].tolist(), inputs["loss_mask"].tolist())]
    assert scored == [["nurse"], ["doctor"]]
    # truncation keeps the flags of the tokens that remain
    [short] = encode_examples(word_tokenizer, [forget], max_length=4, differing=True)
    assert short.n_scored == 3 and short.kept == (False, True, False)


def test_the_kl_stream_and_the_all_setting_are_untouched(word_tokenizer):
    sets = build_sets([nurse_cluster()], adversarial_fraction=1.0)
    streams = encode_streams(word_tokenizer, sets, ("forget", "retain", "kl"), 64, "differing")
    assert [type(e).__name__ for e in streams["forget"]] == ["MaskedPair", "MaskedPair"]  # incl. the adversarial one
    assert [type(e).__name__ for e in streams["kl"]] == ["EncodedPair"]
    assert all(type(e).__name__ == "EncodedPair" for s in encode_streams(word_tokenizer, sets, ("forget",), 64).values() for e in s)


def test_a_differing_tokens_run_scores_fewer_forget_tokens(tmp_path):
    counts = {}
    for setting in ("all", "differing"):
        trainer = make_trainer(tmp_path / setting, loss_tokens=setting, max_steps=1)
        batches = trainer._next_batches()
        out = {name: trainer.passes.stream_output(name, batch) for name, batch in batches.items()}
        counts[setting] = {name: int(o.n_tokens.sum()) for name, o in out.items()}
    # toy continuations " kind." vs " rude." (one token per character): the space and "." are shared
    assert counts["differing"]["forget"] < counts["all"]["forget"]
    assert counts["differing"]["retain"] < counts["all"]["retain"]
    assert counts["differing"]["kl"] == counts["all"]["kl"]
    assert make_trainer(tmp_path / "run", loss_tokens="differing", npo_reduction="token_mean", max_steps=1).train().steps == 1
