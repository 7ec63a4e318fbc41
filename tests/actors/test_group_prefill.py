"""The transformers engine's group prefill: a prompt's image and prefill run once for its n
samples, and the samples are those of n separate prefills (the same tokens, log-probs
within 1e-5), greedy and seeded sampling, prompts of different lengths (left padding)."""

from __future__ import annotations

import pytest

from actors.rollout import Sampling, TransformersEngine
from tests.actors.rollout_check import circle
from vlrlhf.models.registry import ADAPTERS
from vlrlhf.models.tiny import BUILDERS

FAMILIES = [family for family in BUILDERS if ADAPTERS[family].shared_prefill]


def requests():
    return [{"messages": [{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
             "images": [circle("red")]},
            {"messages": [{"role": "user", "content": "<image>\nName the colour of the circle in this picture."}],
             "images": [circle("blue")]}]


def run(engine, sampling, shared: bool):
    engine.adapter.shared_prefill = shared
    return engine.generate(requests(), sampling)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_prefill_per_prompt_gives_the_samples_of_n_prefills(tiny_path, family):
    engine = TransformersEngine(str(tiny_path(family)))
    for sampling in (Sampling(n=3, max_tokens=6, temperature=0.0), Sampling(n=3, max_tokens=6, seed=7)):
        once, separate = run(engine, sampling, True), run(engine, sampling, False)
        assert [s.request for s in once] == [0, 0, 0, 1, 1, 1]
        assert [s.token_ids for s in once] == [s.token_ids for s in separate]
        for a, b in zip(once, separate, strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_families_that_cannot_share_a_prefill_say_so():
    assert not ADAPTERS["paligemma"].shared_prefill and not ADAPTERS["instructblip"].shared_prefill
    assert len(FAMILIES) == len(BUILDERS) - 2
