"""Rollouts fan out: each engine samples its own share of the step's prompts with its own seed,
and the samples come back in prompt order."""

from __future__ import annotations

import pytest

from actors.group import ActorGroup
from actors.rollout import (RolloutWorker, Sampling, TransformersEngine, collect_rollout, engine_seed, shares,
                            start_rollout)
from tests.actors.prompts import prompt_slices
from vlrlhf.rows import step_prompts
from tests.actors.rollout_check import circle
from vlrlhf.config import GroupSpec

COLOURS = ["red", "green", "blue", "yellow", "purple"]


def request(colour: str) -> dict:
    return {"messages": [{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
            "images": [circle(colour)]}


@pytest.mark.parametrize("count,parts", [(5, 2), (16, 4), (3, 4), (0, 2), (7, 1)])
def test_shares_cover_every_prompt_once_and_differ_by_at_most_one(count, parts):
    ranges = shares(count, parts)
    assert len(ranges) == parts
    assert [i for r in ranges for i in r] == list(range(count))  # contiguous, in order, each once
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_two_engines_sample_distinct_shares_gathered_in_prompt_order(ray_cluster, tiny_path, tmp_path):
    """The engines get the step's prompts as object-store slices, fetch their own share, load its
    images and encode it themselves, and put the encodings in the object store for the roles
    that score and train: the driver hands over and gets back references only."""
    class RecordingRolloutWorker(RolloutWorker):  # pickled by value into the Ray workers
        def generate(self, requests, sampling):
            centre = [r["images"][0].getpixel((28, 28)) for r in requests]  # which circles this engine got
            self.seen = getattr(self, "seen", []) + [(centre, sampling.seed)]
            return super().generate(requests, sampling)

        def served(self):
            return self.seen

    path = str(tiny_path("llava"))
    requests = [request(colour) for colour in COLOURS]
    prompts, settings, _kept = prompt_slices(tmp_path / "prompts", [r["images"][0] for r in requests], path)
    rollout = ActorGroup(RecordingRolloutWorker, GroupSpec(num_workers=2, cpus=0.25), name="rollout-fan-out",
                         args=("transformers", path))
    try:
        sampled = collect_rollout(rollout, start_rollout(rollout, prompts, Sampling(n=2, max_tokens=4, seed=7),
                                                         settings))
        greedy = collect_rollout(rollout, start_rollout(rollout, prompts, Sampling(n=1, temperature=0.0,
                                                                                   max_tokens=6), settings))
        encoded = step_prompts(greedy.prompts)  # what the other roles fetch: one encoding per prompt
        served = rollout.get(rollout.broadcast("served"))
    finally:
        rollout.shutdown()
    pixels = [r["images"][0].getpixel((28, 28)) for r in requests]
    (first, seed_0), _ = served[0]
    (second, seed_1), _ = served[1]
    assert first == pixels[:3] and second == pixels[3:]  # balanced shares: 3 + 2, each prompt once
    assert (seed_0, seed_1) == (7, engine_seed(7, 1)) and seed_0 != seed_1  # engine 0 keeps the step's seed
    assert [s.request for s in sampled.samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert all(1 <= s.length <= 4 and len(s.logprobs) == s.length for s in sampled.samples)
    assert [r.answer for r in sampled.records] == ["0", "1", "2", "3", "4"]  # for the rule rewards
    assert all(not r.images for r in sampled.records)  # the records come back without their images
    adapter = TransformersEngine(path).adapter
    assert [item.encoded.input_ids for item in encoded] == [
        adapter.encode_prompt(r["messages"], r["images"]).input_ids for r in requests]
    # gathered in prompt order: the same answers one engine gives to all five prompts
    oracle = TransformersEngine(path).generate(requests, Sampling(n=1, temperature=0.0, max_tokens=6))
    assert [s.request for s in greedy.samples] == [0, 1, 2, 3, 4]
    assert [s.token_ids for s in greedy.samples] == [s.token_ids for s in oracle]
    assert max(abs(a - b) for x, y in zip(greedy.samples, oracle, strict=True)
               for a, b in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4
