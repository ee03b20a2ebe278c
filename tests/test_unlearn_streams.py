"""Stream samplers: seeded epochs, and one sampler per (stream, focus, swap) kept across focus changes.

A focus that comes back (dynamic swapping: gender, race, gender) must draw its *next* batches,
in one run and across a checkpoint.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from amendlm.unlearn.streams import StreamSampler, StreamSamplers, sampler_tag
from tests.test_unlearn_trainer import interrupt_at, make_trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_sampler_walks_seeded_epochs_that_cover_the_stream():
    sampler = StreamSampler(5, seed=0, name="forget:None:False")
    first, second = sampler.take(5), sampler.take(5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4]  # each epoch is a permutation
    assert (sampler.epoch, sampler.position) == (2, 0)
    again = StreamSampler(5, seed=0, name="forget:None:False")
    assert again.take(3) + again.take(4) == first + second[:2]  # crossing an epoch boundary
    with pytest.raises(ValueError, match="'kl:None:False' is empty"):
        StreamSampler(0, seed=0, name="kl:None:False")


def test_pairs_share_one_tag_and_the_tag_names_focus_and_swap():
    assert sampler_tag("chosen", "race", True) == sampler_tag("rejected", "race", True) == "pairs:race:True"
    assert sampler_tag("forget", None, False) == "forget:None:False"


def test_a_tag_used_before_continues_where_it_stopped():
    pool = StreamSamplers(seed=3)
    gender = pool.sampler("forget:gender:False", 8)
    first = gender.take(2)
    pool.sampler("forget:race:False", 6).take(2)  # the focus moves on ...
    again = pool.sampler("forget:gender:False", 8)  # ... and comes back
    never_left = StreamSampler(8, seed=3, name="forget:gender:False").take(4)
    assert again is gender and again.take(2) == never_left[2:] != first


def test_the_state_of_every_tag_survives_a_json_round_trip():
    pool = StreamSamplers(seed=1)
    pool.sampler("forget:gender:False", 8).take(3)
    pool.sampler("forget:race:True", 6).take(5)
    saved = json.loads(json.dumps(pool.state_dict()))
    assert saved == {"forget:gender:False": {"epoch": 0, "position": 3, "size": 8},
                     "forget:race:True": {"epoch": 0, "position": 5, "size": 6}}
    restored = StreamSamplers(seed=1)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved  # tags loaded but not used yet are kept for the next checkpoint
    race = restored.sampler("forget:race:True", 6)
    assert (race.epoch, race.position) == (0, 5)
    assert restored.sampler("forget:gender:False", 9).position == 0  # a stream of another size starts afresh


def draw(trainer, focus):
    """Move ``trainer`` to ``focus`` (roles not swapped) and draw one batch of every stream (token ids)."""
    trainer.state.focus, trainer.state.swap = focus, False
    trainer._build_streams()
    return {name: [item.ids for item in batch] for name, batch in trainer._next_batches().items()}


def test_a_revisited_focus_draws_its_next_batches_not_its_first(tmp_path):
    trainer = make_trainer(tmp_path / "a")
    first = draw(trainer, "gender")
    draw(trainer, "race")
    again = draw(trainer, "gender")
    steady = make_trainer(tmp_path / "b")  # a run whose focus never left gender
    draw(steady, "gender")
    assert again == draw(steady, "gender")
    assert again["forget"] != first["forget"] and again["retain"] != first["retain"]


def test_the_checkpoint_keeps_the_streams_of_every_focus_visited(tmp_path):
    trainer = make_trainer(tmp_path)
    draw(trainer, "gender")
    draw(trainer, "race")
    trainer.out.mkdir(parents=True)
    trainer._checkpoint()
    saved = json.loads((trainer.out / "checkpoint" / "state.json").read_text())["samplers"]
    assert {"forget:gender:False", "forget:race:False", "retain:gender:False", "kl:race:False"} <= set(saved)
    resumed = make_trainer(tmp_path)
    resumed._resume()
    assert resumed.state.focus == "race"
    assert draw(resumed, "gender") == draw(trainer, "gender")  # gender's second batches in both


def test_resume_with_a_focus_that_alternates_ends_in_the_same_weights(tmp_path, monkeypatch):
    """Focus gender, race, gender, race; interrupted while on race, so gender's sampler comes from the checkpoint."""
    from amendlm.unlearn import trainer as trainer_module
    from amendlm.unlearn.schedule import Phase, SwapDecision

    current = []

    def alternate(ss_by_type, tolerance, phases):  # evaluate after every step, alternate the focus
        focus = sorted(ss_by_type)[current[-1].state.step % 2]
        return SwapDecision(stop=False, focus=focus, swap=False, gap=10.0, phase=Phase(0.0, 1.0, 10, 1))

    monkeypatch.setattr(trainer_module, "decide", alternate)
    common = dict(keep_best=False, max_steps=4)
    current.append(make_trainer(tmp_path / "a", **common))
    current[-1].train()
    reference = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["focus"] for r in records if "loss" in r] == ["gender", "race", "gender", "race"]

    first = make_trainer(tmp_path / "b", **common)
    current.append(first)
    interrupt_at(first, 1)
    assert first.train().status == "interrupted"
    current.append(make_trainer(tmp_path / "b", **common))
    assert current[-1].train(resume=True).steps == 4
    weights = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=0, atol=1e-7)
