"""Forget / retain / KL sets, the adversarial draw and the swap rule."""

import pytest

from amendlm.data.stereoset import StereoSetCluster
from amendlm.unlearn.data import Example, adversarial_ids, build_sets
from amendlm.unlearn.schedule import OFFICIAL_PHASES, Phase, decide, pick_phase, scaled_phases, types_to_train


def cluster(i: int, bias_type: str, task: str = "intrasentence") -> StereoSetCluster:
    if task == "intrasentence":
        return StereoSetCluster(f"t:{i}", task, f"target{i % 3}", bias_type, "The nurse is BLANK today.",
                                "The nurse is kind today.", "The nurse is rude today.", "The nurse is fork today.")
    return StereoSetCluster(f"t:{i}", task, f"target{i % 3}", bias_type, "He is a chess player.",
                            "He is smart.", "He is dumb.", "Cats drink milk.")


def test_training_pairs_score_the_continuation_with_leading_space():
    sets = build_sets([cluster(0, "gender"), cluster(1, "race", "intersentence")], adversarial_fraction=0.0)
    assert sets.forget[0] == Example("The nurse is", " kind today.", "gender", "stereotype", "t:0")
    assert sets.retain[1] == Example("He is a chess player.", " He is dumb.", "race", "anti_stereotype", "t:1")
    assert [e.label for e in sets.kl] == ["unrelated", "unrelated"]
    assert sets.pairs[0].chosen.label == "anti_stereotype" and sets.pairs[0].rejected.label == "stereotype"


def test_adversarial_fraction_is_stratified_per_bias_type_and_seeded():
    clusters = [cluster(i, "gender") for i in range(8)] + [cluster(i, "race") for i in range(8, 12)]
    chosen = adversarial_ids(clusters, 0.25, seed=3)
    assert len([c for c in clusters[:8] if c.id in chosen]) == 2
    assert len([c for c in clusters[8:] if c.id in chosen]) == 1
    assert adversarial_ids(list(reversed(clusters)), 0.25, seed=3) == chosen
    sets = build_sets(clusters, 0.25, seed=3)
    assert len(sets.forget) == 12 + 3
    assert sum(e.label == "anti_stereotype" for e in sets.forget) == 3
    assert len(sets.retain) == 12  # the adversarial ones stay in the retain set
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        adversarial_ids(clusters, 1.5, 0)


def test_swap_and_focus_exchange_roles_for_one_type_only():
    clusters = [cluster(0, "gender"), cluster(1, "race")]
    sets = build_sets(clusters, 0.0, swapped=["gender"])
    assert [(e.bias_type, e.label) for e in sets.forget] == [("gender", "anti_stereotype"), ("race", "stereotype")]
    focused = build_sets(clusters, 0.0, swapped=["gender"], focus="gender",
                         general_texts=[Example("", "Some text.", "", "text")])
    assert [e.bias_type for e in focused.forget + focused.retain] == ["gender", "gender"]
    assert len(focused.kl) == 3  # KL is never restricted
    with pytest.raises(ValueError, match="valid: gender, race"):
        build_sets(clusters, focus="religion")


def test_the_kl_set_without_the_unrelated_sentences_is_the_general_text_only():
    text = Example("", "Some text.", "", "text")
    sets = build_sets([cluster(0, "gender"), cluster(1, "race")], 0.0, general_texts=[text], kl_unrelated=False)
    assert sets.kl == [text] and len(sets.forget) == len(sets.retain) == 2


def test_an_empty_kl_set_is_refused_up_front(tmp_path):
    from amendlm.unlearn.config import UnlearnConfig

    with pytest.raises(ValueError, match="KL set empty"):
        UnlearnConfig(out=str(tmp_path), kl_unrelated=False, kl_texts=None)
    UnlearnConfig(out=str(tmp_path), method="dpo", kl_unrelated=False, kl_texts=None)  # DPO has no KL stream


def test_decide_focuses_on_the_worst_category():
    d = decide({"gender": 58.0, "race": 45.0, "religion": 51.0})
    assert (d.stop, d.focus, d.swap, d.gap) == (False, "gender", False, 8.0)
    assert d.phase == OFFICIAL_PHASES[0]


def test_decide_swaps_roles_when_bias_reversed():
    d = decide({"gender": 51.0, "race": 46.0})
    assert (d.focus, d.swap, d.gap) == ("race", True, 4.0)
    assert d.phase.lr_scale == 0.8 and d.phase.eval_every == 50


def test_decide_stops_when_every_gap_is_below_tolerance():
    assert decide({"gender": 51.9, "race": 48.1}).stop
    assert not decide({"gender": 52.0, "race": 50.0}).stop  # a gap of exactly 2 is not below 2
    with pytest.raises(ValueError):
        decide({})


def test_phases_follow_the_official_schedule_and_scale():
    assert pick_phase(6.0).scheduler_steps == 1000
    assert pick_phase(5.0).eval_every == 50  # 3 < gap <= 5
    assert pick_phase(2.5).eval_every == 30
    assert scaled_phases(OFFICIAL_PHASES, 0.25)[0] == Phase(5.0, 1.0, 250, 20)


def test_every_field_added_since_the_first_runs_is_in_fields_added():
    from dataclasses import fields

    from amendlm.unlearn.config import FIELDS_ADDED, UnlearnConfig

    first = {"out", "model", "method", "max_steps", "batch_size", "lr", "weight_decay", "warmup_steps", "max_grad_norm",
             "alpha_forget", "alpha_retain", "alpha_kl", "npo_beta", "npo_reduction", "dpo_beta", "adversarial_fraction",
             "kl_texts", "kl_text_field", "kl_text_limit", "kl_chunk_tokens", "max_length", "finetune", "lora_r",
             "lora_alpha", "lora_dropout", "target_modules", "reference", "tolerance", "phases", "schedule_scale",
             "eval_every", "val_clusters", "checkpoint_every", "keep_best", "seed", "split_seed", "dtype", "cpu",
             "stereoset"}
    assert {f.name for f in fields(UnlearnConfig)} - first == set(FIELDS_ADDED)


def test_types_to_train_leaves_out_the_types_within_the_tolerance_and_swaps_those_below_50():
    active, swapped = types_to_train({"race": 51.0, "gender": 44.0, "religion": 58.0, "profession": 48.5}, 2.0)
    assert active == ["gender", "religion"] and swapped == ["gender"]
    assert types_to_train({"race": 52.0, "gender": 48.0}, 2.0) == (["gender", "race"], ["gender"])  # the bound trains


def test_types_to_train_rests_the_types_near_50_while_others_are_far():
    ss = {"race": 48.9, "gender": 56.5, "religion": 58.0, "profession": 53.7}
    # race (1.1) within the tolerance; profession (3.7) rests at rest_within 4: only the far types train
    assert types_to_train(ss, 2.0, rest_within=4.0) == (["gender", "religion"], [])
    # none is far: every type outside the tolerance trains, the swapped one included
    assert types_to_train({"race": 47.0, "gender": 53.5}, 2.0, rest_within=4.0) == (["gender", "race"], ["race"])
    assert types_to_train(ss, 2.0, rest_within=None) == (["gender", "profession", "religion"], [])


def test_rest_within_needs_type_focus_all_and_at_least_the_tolerance():
    from amendlm.unlearn.config import UnlearnConfig

    def refusal(**fields) -> str:
        with pytest.raises(ValueError) as caught:
            UnlearnConfig(out="x", **fields)
        return str(caught.value)

    # one message per condition, naming the one that failed
    # where the value came from, as far as the config can tell: not "from recipe biasunlearn", which sets nothing
    assert refusal(rest_within=4.0) == "rest_within=4.0 needs type_focus='all' (type_focus='worst', the field default)"
    assert refusal(type_focus="worst", rest_within=4.0, recipe_overrides={"type_focus": "worst"}).endswith(
        "(type_focus='worst', given)")
    assert refusal(type_focus="all", rest_within=1.0).startswith("rest_within=1.0 must be >= tolerance (2, ")
    assert refusal(type_focus="all", rest_within=-1.0).startswith("rest_within=-1.0 must be >= tolerance (2, ")
    assert refusal(type_focus="all", rest_within=float("nan")) == "rest_within=nan must be finite (a val SS gap)"
    with pytest.raises(ValueError, match=r"needs type_focus='all' \(type_focus='worst', the field default\)"):
        UnlearnConfig.from_recipe("official", "x", {"rest_within": 4.0})  # official leaves type_focus alone
    with pytest.raises(ValueError, match=r"needs type_focus='all' \(type_focus='worst', given\)"):
        UnlearnConfig.from_recipe("pairwise", "x", {"rest_within": 4.0, "type_focus": "worst"})  # pairwise sets all
    assert UnlearnConfig(out="x", type_focus="all", rest_within=4.0).rest_within == 4.0


def test_schedule_scale_is_refused_by_its_field_name():
    from amendlm.unlearn.config import UnlearnConfig
    from amendlm.unlearn.field_errors import ConfigFieldError

    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigFieldError, match=r"^schedule_scale must be a finite number > 0, got ") as caught:
            UnlearnConfig(out="x", schedule_scale=scale)
        assert caught.value.fields == ("schedule_scale",)
