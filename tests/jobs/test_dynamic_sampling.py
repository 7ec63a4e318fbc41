"""DAPO's dynamic sampling (online.dynamic_sampling): a step refills itself with groups whose
rewards differ, from further prompts, up to max_rounds rollouts."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from actors.rollout import RolloutResult, Sample
from jobs.run import run_job
from jobs.sampling import informative, merged, merged_metrics, selected
from vlrlhf.config import load_spec
from vlrlhf.rows import Row

ROOT = pathlib.Path(__file__).resolve().parents[2]
REWARD = "online.rewards=[{function: 'tests.jobs.dynamic_reward:odd_rows_differ', weight: 1.0}]"


def test_the_first_informative_groups_are_selected_in_prompt_order():
    scores = torch.tensor([1., 1., 0., 1., 0., 0., 1., 0., .5, .5, .2, .3])  # 6 groups of 2
    assert informative(scores, 2).tolist() == [False, True, False, True, False, True]
    assert selected(scores, 2, 2).tolist() == [False, True, False, True, False, False]
    assert selected(scores, 2, 9).tolist() == [False, True, False, True, False, True]
    assert selected(scores, 2, 0).tolist() == [False] * 6


def sample(request: int, text: str) -> Sample:
    return Sample(request=request, token_ids=[1, 2], logprobs=[-1.0, -2.0], text=text, finish_reason="stop")


def test_a_second_rollout_follows_the_first_with_its_prompt_indices_shifted():
    first = RolloutResult([sample(0, "a"), sample(0, "b"), sample(1, "c"), sample(1, "d")], ["r0", "r1"], 7, ["p0"])
    second = RolloutResult([sample(0, "e"), sample(0, "f")], ["r2"], 12, ["p1"])
    rows = [Row(None, s.request, s.logprobs, text=s.text) for s in first.samples]
    more = [Row(None, s.request, s.logprobs, ref_logprobs=[-1.5, -2.5], text=s.text) for s in second.samples]
    result, all_rows = merged(first, rows, second, more)
    assert [s.request for s in result.samples] == [0, 0, 1, 1, 2, 2]
    assert [s.text for s in result.samples] == list("abcdef")
    assert result.records == ["r0", "r1", "r2"] and result.prompts == ["p0", "p1"] and result.last_key == 12
    assert [row.request for row in all_rows] == [0, 0, 1, 1, 2, 2]
    assert all_rows[4].ref_logprobs == [-1.5, -2.5] and more[0].request == 0  # the inputs are unchanged


def test_scoring_metrics_of_two_rounds_are_sample_means_and_failure_counts():
    first = {"train/rewards/math": 0.5, "train/reward_failures/math": 1.0}
    second = {"train/rewards/math": 1.0, "train/reward_failures/math": 2.0}
    out = merged_metrics(first, 4, second, 12)
    assert out == {"train/rewards/math": pytest.approx((0.5 * 4 + 1.0 * 12) / 16), "train/reward_failures/math": 3.0}
    assert merged_metrics({"train/rewards/x": 1.0}, 2, {"train/rewards/x": 1.0, "train/reward_failures/x": 1.0},
                          2)["train/reward_failures/x"] == 1.0


@pytest.mark.parametrize("override, message", [
    ("algorithm.name=reinforce_pp", "only the group baselines use"),
    ("online.async_rollout=true", "use one of them"),
])
def test_dynamic_sampling_is_for_group_baselines_without_async_rollouts(override, message):
    with pytest.raises(ValueError, match=message):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["online.dynamic_sampling={max_rounds: 2}", override])


def test_a_grpo_step_samples_more_prompts_until_it_holds_enough_informative_groups(ray_cluster, tmp_path):
    """Even rows' groups are all equal, odd rows' differ: a step of 4 prompts keeps rolling
    out 4 more until 4 informative groups are in (at most 3 rollouts), and trains on the
    first 4 of them; every rollout's prompts are consumed and seeded."""
    run_dir, wanted, n, limit = tmp_path / "run", 4, 2, 3
    overrides = ["trainer.max_steps=3", f"checkpoint.dir={tmp_path / 'ck'}", f"online.prompts_per_step={wanted}",
                 f"online.n={n}", REWARD, f"online.dynamic_sampling={{max_rounds: {limit}}}"]
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    steps = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        rounds, found = int(row["train/sampling_rounds"]), int(row["train/informative_groups"])
        assert 1 <= rounds <= limit
        assert rounds == limit or found >= wanted  # stopped early only when the step was full
        assert row["train/trained_samples"] == n * min(found, wanted)
        assert row["train/groups_kept"] == pytest.approx(min(found, wanted) / (wanted * rounds))
    assert any(row["train/sampling_rounds"] > 1 for row in steps)  # half the groups are no signal
    state = json.loads((tmp_path / "ck" / "step-000003" / "online_state.json").read_text())
    assert state["submitted"] == sum(int(row["train/sampling_rounds"]) for row in steps)  # a seed per rollout
