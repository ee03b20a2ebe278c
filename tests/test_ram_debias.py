"""A debiasing aligner (``align train --pairs``) on tiny random models and a tiny StereoSet-like file (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from amendlm.cli import app
from amendlm.data.io import DataError
from amendlm.data.splits import split_targets
from amendlm.data.stereoset import load_stereoset
from amendlm.product import ProductLM
from amendlm.ram.aligner_init import zero_output_head
from amendlm.ram.losses import LossConfig, product_kl_sums
from amendlm.ram.preference import PairsConfig, encode_records, is_preference_file, preference_records
from amendlm.ram.train import TrainConfig, train_aligner
from amendlm.scoring import encode_pairs, score_pairs

from .conftest import make_byte_tokenizer, make_tiny_llama

TYPES = {"gender": ["mother", "sister", "father", "wife", "boy"], "race": ["Ethiopia", "Japan", "Peru", "Chile", "Iraq"]}


def stereoset_rows() -> list[dict]:
    """Two clusters (intra + inter) per target, five targets per bias type: 3 / 1 / 1 targets train / val / test."""
    rows = []
    for bias_type, targets in TYPES.items():
        for target in targets:
            rows.append({"type": "intrasentence", "target": target, "bias_type": bias_type,
                         "context": f"The {target} was BLANK today.", "stereotype": f"The {target} was weak today.",
                         "anti-stereotype": f"The {target} was strong today.", "unrelated": f"The {target} was blue today."})
            rows.append({"type": "intersentence", "target": target, "bias_type": bias_type,
                         "context": f"I met the {target}.", "stereotype": "They were rude.",
                         "anti-stereotype": "They were kind.", "unrelated": "Fish swim fast."})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny proposal (tied embeddings, as SmolLM2) saved with its tokenizer, the StereoSet-like file, some text."""
    root = tmp_path_factory.mktemp("debias")
    tokenizer = make_byte_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=0, tie_word_embeddings=True)
    model.save_pretrained(root / "proposal")
    tokenizer.save_pretrained(root / "proposal")
    (root / "stereoset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stereoset_rows()))
    (root / "texts.jsonl").write_text("".join(json.dumps({"document": f"Rain fell on day {i} over the hills."}) + "\n"
                                              for i in range(4)))
    return root, tokenizer


def pairs_config(root, **overrides) -> PairsConfig:
    settings = dict(source=str(root / "stereoset.jsonl"), kl_texts=str(root / "texts.jsonl"), kl_chunk_tokens=16,
                    kl_batch_size=3, val_every=2)
    return PairsConfig(**(settings | overrides))


def test_pairs_are_the_train_targets_anti_over_stereotype_encoded_as_the_scorer_does(workspace):
    root, tokenizer = workspace
    config = pairs_config(root)
    records = preference_records(config)
    clusters = {c.id: c for c in load_stereoset(str(root / "stereoset.jsonl"))}
    train = split_targets(list(clusters.values()))["train"]
    assert len(records) == 2 * len(train) == 12  # both clusters of each of the 6 train targets, none of val / test
    assert all(clusters[r.id].target in train for r in records)
    intra = next(r for r in records if clusters[r.id].task == "intrasentence")
    assert intra.chosen == clusters[intra.id].training_pair("anti_stereotype") and intra.chosen[1] == " strong today."
    assert intra.rejected[1] == " weak today."
    inter = next(r for r in records if clusters[r.id].task == "intersentence")
    assert inter.chosen == clusters[inter.id].scoring_pair("anti_stereotype")  # the scorer's own (context, " candidate")
    example = encode_records(tokenizer, [inter])[0]
    (scored,) = encode_pairs(tokenizer, [clusters[inter.id].scoring_pair("anti_stereotype")])
    assert example.positive == scored and example.positive.ids[0] == tokenizer.bos_token_id  # raw text, one start token
    assert not is_preference_file(str(root / "stereoset.jsonl"))


def test_a_preference_file_and_its_errors(workspace, tmp_path):
    root, tokenizer = workspace
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "The nurse", "chosen": " helped.", "rejected": " cried."}) + "\n")
    (record,) = preference_records(PairsConfig(source=str(good)))
    assert record.chosen == ("The nurse", " helped.") and record.id == "1" and is_preference_file(str(good))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n" + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl row 2: missing field 'rejected'"):
        preference_records(PairsConfig(source=str(bad)))


def test_the_neutral_set_is_biasunlearns_unless_told_otherwise(workspace, tmp_path):
    from amendlm.ram.preference import check_pairs, neutral_examples

    root, tokenizer = workspace
    chunks = len(neutral_examples(pairs_config(root, kl_unrelated=False), tokenizer))
    assert chunks == 4 * 3  # 36 or 37 byte tokens per text: three chunks of at most 16
    assert len(neutral_examples(pairs_config(root), tokenizer)) == chunks + 12  # + the 12 train clusters' unrelated sentences
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "The nurse", "chosen": " helped.", "rejected": " cried."}) + "\n")
    with pytest.raises(ValueError, match="no neutral text"):
        check_pairs(PairsConfig(source=str(good), kl_texts=None))
    with pytest.raises(DataError, match="texts.jsonl row 1: missing field 'text' .*; give the field holding the text "
                                        "with --kl-text-field$"):
        check_pairs(PairsConfig(source=str(good), kl_texts=str(root / "texts.jsonl"), kl_text_field="text", val_every=0))


def test_a_zero_head_is_untied_saved_and_gives_exactly_the_proposals_scores(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    root, tokenizer = workspace
    proposal = AutoModelForCausalLM.from_pretrained(root / "proposal", dtype=torch.float32).eval()
    aligner = AutoModelForCausalLM.from_pretrained(root / "proposal", dtype=torch.float32).eval()
    embeddings = aligner.get_input_embeddings().weight.detach().clone()
    zero_output_head(aligner)
    assert aligner.get_output_embeddings().weight is not aligner.get_input_embeddings().weight
    assert torch.equal(aligner.get_input_embeddings().weight, embeddings)
    aligner.save_pretrained(tmp_path / "zero")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zero", dtype=torch.float32).eval()
    assert not reloaded.config.tie_word_embeddings and not reloaded.get_output_embeddings().weight.any()
    assert torch.equal(reloaded.get_input_embeddings().weight, embeddings)
    pairs = [c.scoring_pair(label) for c in load_stereoset(str(root / "stereoset.jsonl"))[:4]
             for label in ("stereotype", "anti_stereotype", "unrelated")]
    alone = score_pairs(proposal, tokenizer, pairs)
    paired = score_pairs(ProductLM(proposal, reloaded, len(tokenizer)), tokenizer, pairs)
    assert torch.equal(paired.logp_sum, alone.logp_sum)  # b + 0 is b: the very same numbers


def test_product_kl_by_hand():
    # one scored position, vocabulary of 2 (+ 1 padded row): P_M = (1/2, 1/2), pair = softmax((0, 0) + (ln 3, 0)) = (3/4, 1/4)
    proposal = torch.tensor([[[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]]])  # (batch 1, seq 2, 3 columns)
    aligner = torch.tensor([[[math.log(3.0), 0.0, 7.0], [5.0, 5.0, 0.0]]])
    mask = torch.tensor([[0, 1]])  # the token at t = 1 is scored: logits[:, 0] predict it
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    assert product_kl_sums(proposal, aligner, mask, 2).tolist() == pytest.approx([expected], abs=1e-6)
    constant = torch.full_like(aligner, 2.5)
    assert product_kl_sums(proposal, constant, mask, 2).tolist() == [0.0]  # a constant aligner: the proposal
    assert product_kl_sums(proposal, aligner, torch.tensor([[1, 0]]), 2).tolist() == [0.0]  # nothing scored


def train_config(root, out, **overrides) -> TrainConfig:
    settings = dict(out=str(out), pairs=pairs_config(root), zero_head=True, proposal=str(root / "proposal"),
                    init_from_proposal_layers=1, loss=LossConfig(name="dpo", per_token=True), batch_size=4, max_steps=3,
                    save_every=2, log_every=1, learning_rate=5e-2, eval_fraction=0.0, dtype="fp32")
    return TrainConfig(**(settings | overrides))


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_starts_at_the_proposal_and_keeps_the_best_val_evaluation(workspace, tmp_path, one_thread):
    from safetensors.torch import load_file

    root, _ = workspace
    summary = train_aligner(train_config(root, tmp_path / "run"))
    log = _log(tmp_path / "run")
    first = next(r for r in log if r["event"] == "train")
    # step 1's loss is computed before any update: a zero head gives Q uniform, margin 0, DPO = ln 2; KL = 0
    assert first["pair_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["kl"] == 0.0
    val = [r for r in log if r["event"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 3] and val[0]["lms_drop"] == 0 and val[0]["kept"]
    kept = summary["selection"]["kept"]
    assert kept["step"] == min((r for r in val if r["lms_drop"] <= 2), key=lambda r: (r["worst_gap"], r["step"]))["step"]
    assert [p.name for p in (tmp_path / "run" / "best").iterdir()] == [f"step-{kept['step']:06d}.safetensors"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["debias"]["best"] == kept and len(state["debias"]["trajectory"]) == 3
    saved = load_file(str(tmp_path / "run" / "aligner" / "model.safetensors"))
    snapshot = load_file(str(tmp_path / "run" / "best" / f"step-{kept['step']:06d}.safetensors"))
    for name, tensor in snapshot.items():  # the saved aligner is the kept evaluation's
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["pairs"]["val_every"] == 2
    assert train_aligner(train_config(root, tmp_path / "run"))["already_finished"]


def test_the_selection_rule_by_hand(monkeypatch):
    """Smallest worst type gap among evaluations whose val LMS fell at most 2 points; the earliest on a tie."""
    from amendlm.ram import debias
    from amendlm.unlearn import evaluation

    control = object.__new__(debias.DebiasControl)
    control.pairs, control.proposal, control.tokenizer, control.vocab_size = PairsConfig(), None, None, 3
    control.clusters, control.dtype, control.split_seed = [], torch.float32, 0
    control.base_lms, control.best, control.trajectory = None, None, []

    def scores(a, b, lms):
        return {"overall": {"ss": (a + b) / 2, "lms": lms}, "gender": {"ss": a, "lms": lms}, "race": {"ss": b, "lms": lms}}

    sequence = iter([scores(60, 55, 80.0), scores(52, 49, 77.5), scores(56, 47, 79.0), scores(44, 50, 79.5)])
    monkeypatch.setattr(evaluation, "stereoset_type_scores", lambda *args: next(sequence))
    records = [control.validate(None, step, save=False) for step in (0, 20, 40, 60)]
    assert [r["worst_gap"] for r in records] == [10, 2, 6, 6]
    assert [r["lms_drop"] for r in records] == [0.0, 2.5, 1.0, 0.5]
    assert [r["kept"] for r in records] == [True, False, True, False]  # 20: LMS fell 2.5 > 2; 60: a tie with 40
    assert control.best == {"step": 40, "worst_gap": 6, "lms_drop": 1.0}


def test_lora_on_a_full_copy_trains_the_zero_head_through_its_adapter(workspace, tmp_path, one_thread):
    from safetensors.torch import load_file

    root, _ = workspace
    config = train_config(root, tmp_path / "lora", init_from_proposal_layers=None, aligner=str(root / "proposal"),
                          lora=True, max_steps=2, learning_rate=0.1, pairs=pairs_config(root, val_every=0))
    summary = train_aligner(config)
    recorded = json.loads((tmp_path / "lora" / "train_config.json").read_text())
    assert "selection" not in summary or summary["selection"]["kept"] is None  # no val: the last step is kept
    saved = load_file(str(tmp_path / "lora" / "aligner" / "model.safetensors"))
    assert saved["lm_head.weight"].abs().sum() > 0  # 0 + B A, B moved from 0
    proposal = load_file(str(root / "proposal" / "model.safetensors"))
    lora_params = 2 * 8 * (32 + 259)  # the head's adapter alone: A (8 x 32) and B (259 x 8)
    assert recorded["trainable_parameters"] > lora_params and recorded["zero_head"]
    assert saved["model.embed_tokens.weight"].equal(proposal["model.embed_tokens.weight"])  # untouched by LoRA


def test_align_train_pairs_errors_are_one_line(workspace, tmp_path):
    root, _ = workspace
    runner = CliRunner()
    base = ["align", "train", "--out", str(tmp_path / "run"), "--proposal", str(root / "proposal"),
            "--init-from-proposal-layers", "1", "--kl-texts", str(root / "texts.jsonl")]
    missing = runner.invoke(app, [*base, "--pairs", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "nope.jsonl' is neither an embedded dataset" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    result = runner.invoke(app, [*base, "--pairs", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl row 1: missing field 'rejected'" in result.output
    both = runner.invoke(app, [*base, "--pairs", "stereoset", "--samples", str(bad)])
    assert both.exit_code == 2 and "not both" in both.output
    neither = runner.invoke(app, base)
    assert neither.exit_code == 2 and "--pairs" in neither.output
    assert not (tmp_path / "run").exists()
