"""The RAM XSum page's "why targets are missed" (experiments/ram_why_common.py), from hand-made records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import ram_xsum_common  # noqa: E402
import ram_why_common  # noqa: E402

HELDOUT = {"small8": [{"nll": 177.0}, {"nll": 157.0}], "sft-lora": [{"nll": 86.0}, {"nll": 71.0}],
           "sft-full": [{"nll": 86.0}, {"nll": 72.0}]}
PRODUCT = {"n_prompts": 40, "nll": [{"weight": 0.0, "nll": 86.0}, {"weight": 0.25, "nll": 83.5}, {"weight": 1.0, "nll": 90.0}]}
LABELS = {"proposal": "proposal alone", "sft-lora": "LoRA SFT", "sft-full": "full SFT"}


def entry(met: bool) -> dict:
    systems = {"proposal": {"mean_words": 30.0, "eos_share": 0.5},
               "mds-te4": {"mean_words": 25.0, "eos_share": 0.75, "follows_proposal_argmax": 0.8, "follows_aligner_argmax": 0.3},
               "sft-lora": {"mean_words": 19.0, "eos_share": 1.0}}
    return {"greedy": True, "targets": [{"mode": "mds-te4", "against": "proposal", "met": met, "difference": 0.1,
                                         "low": -1, "high": 1, "target": 2}], "systems": systems}


def test_product_weights_are_zero_and_the_inverse_temperatures():
    assert ram_why_common.product_weights((1.0, 2.0, 4.0)) == [0.0, 0.25, 0.5, 1.0]


def test_why_missed_reads_the_numbers():
    text = ram_why_common.why_missed(entry(False), HELDOUT, "small8", PRODUCT, 22.5, LABELS)
    assert "157.0 nats per summary after training (177.0 before), the proposal 86.0" in text
    assert "LoRA SFT 71.0 and full SFT 72.0" in text
    # best w = 0.25: (86.0 - 83.5) / (86.0 - 71.0) = 1/6 of the way to the better fine-tune
    assert "weaker model" in text and "its best, w = 0.25, is 17 % of the way from the proposal" in text
    assert "at 80.0 % of steps and the aligner's at 30.0 %" in text
    assert "the references average 22.5 words" in text and "`mds-te4` 25.0 words (75 % ended by EOS)" in text
    # the product was scored at T = 1: a sampled decoding's paragraph does not quote it
    sampled = ram_why_common.why_missed({**entry(False), "greedy": False}, HELDOUT, "small8", PRODUCT, 22.5, LABELS)
    assert "w = 0.25" not in sampled and "weaker model" in sampled


def test_why_missed_words_follow_the_numbers():
    flat = {"n_prompts": 40, "nll": [{"weight": 0.0, "nll": 86.0}, {"weight": 1.0, "nll": 90.0}]}
    text = ram_why_common.why_missed(entry(False), HELDOUT, "small8", flat, None, LABELS)
    assert "w = 0, is no closer to the references than the proposal alone" in text
    strong = {**HELDOUT, "small8": [{"nll": 90.0}, {"nll": 80.0}]}
    better = {"n_prompts": 40, "nll": [{"weight": 0.0, "nll": 86.0}, {"weight": 1.0, "nll": 70.0}]}
    text = ram_why_common.why_missed(entry(False), strong, "small8", better, None, LABELS)
    assert "models the reference summaries at least as well as" in text and "as close to the references as the better fine-tune, or closer" in text


def test_why_missed_is_empty_when_every_target_is_met():
    assert ram_why_common.why_missed(entry(True), HELDOUT, "small8", PRODUCT, 22.5, LABELS) == ""


def test_reference_words_counts_each_prompt_once(tmp_path):
    step = tmp_path / "eval_greedy_s0_ram.json"
    rows = [{"system": "proposal", "id": "a", "reference": "one two three"},
            {"system": "aligner", "id": "a", "reference": "one two three"},
            {"system": "proposal", "id": "b", "reference": "four"}]
    step.with_suffix(".generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert ram_why_common.reference_words([tmp_path / "missing.json", step]) == 2.0
    assert ram_why_common.reference_words([tmp_path / "missing.json"]) is None


def test_verdict_adds_the_why_only_when_a_target_is_missed():
    why = ram_why_common.short_why(HELDOUT, "small8", PRODUCT)
    assert "the proposal 86.0, the small aligner 157.0" in why and "weight w = 0.25 83.5, the better fine-tune 71.0" in why
    assert why.endswith("the best product is 17 % of the way from the proposal to the better fine-tune.")
    assert "chosen" not in why and "chosen" not in ram_why_common.short_why(HELDOUT, "small8", PRODUCT, "mds-te4")
    plain = ram_why_common.short_why(HELDOUT, "small8", PRODUCT, "mds")  # the chosen mode's w = 1 differs from the best
    assert "w = 0.25 83.5 (the chosen greedy mode `mds` decodes w = 1: 90.0), the better" in plain
    assert ram_why_common.short_why(HELDOUT, "small8", PRODUCT, "mds-te8") == why  # its w = 1/8 was not measured
    assert [ram_why_common.mode_weight(m) for m in ("mds", "mds-te4", "mds-te0.5", "par-kl", None)] == [1.0, 0.25, 2.0, None, None]
    decodings = {"greedy": {"greedy": True, "best_mode": "mds-te4", "targets": entry(False)["targets"]}}
    assert why in ram_xsum_common.verdict(decodings, "cmd", why)
    decodings["greedy"]["targets"] = entry(True)["targets"]
    assert why not in ram_xsum_common.verdict(decodings, "cmd", why)
    assert ram_why_common.short_why(HELDOUT, "small8", None) == ""
