"""Rule rewards and their error policy."""

from __future__ import annotations

import pytest

from vlrlhf.data.records import PromptRecord
from vlrlhf.rewards import RewardError, RewardSet, RewardTerm
from vlrlhf.rewards.builtin import exact_match, format_match, length_penalty, multiple_choice, numeric


def record(answer, index=0, **metadata):
    return PromptRecord(id=f"p:{index}", prompt=[{"role": "user", "content": "Q?"}], answer=answer,
                        metadata=metadata)


def test_builtins():
    assert exact_match(["Red.", "the red", "RED"], [record("red")] * 3) == [1.0, 0.0, 1.0]
    options = {"A": "circle", "B": "square"}
    assert multiple_choice(["B", "It is a circle", "purple"], [record("B", options=options)] * 3) == [1.0, 0.0, 0.0]
    assert numeric(["x = 3.0001", "about 1,000", "none", "3.1"], [record("3"), record("1000"), record("3"),
                                                                   record("3")], rel_tol=1e-3) == [1.0, 1.0, 0.0, 0.0]
    assert length_penalty(["a" * 5, "a" * 15], [record("a")] * 2, max_chars=10, penalty_per_char=0.5) == [0.0, -2.5]
    assert format_match(["<think>x</think> 4", "4"], [record("4")] * 2, pattern=r"<think>.*</think>.*") == [1.0, 0.0]


def test_weighted_sum_of_terms():
    rewards = RewardSet([RewardTerm("exact_match", weight=1.0),
                         RewardTerm("length_penalty", weight=2.0, options={"max_chars": 3, "penalty_per_char": 0.1})])
    result = rewards.score(["red", "blue!"], [record("red", 0), record("red", 1)])
    assert result.total == pytest.approx([1.0, 2.0 * -0.2])
    assert result.terms["exact_match"] == [1.0, 0.0] and not result.failures


def test_a_failing_sample_is_named_or_scored_by_the_fallback_and_counted():
    records = [record("a", i) for i in range(4)]
    completions = ["fine", "boom", "nan", "fine"]
    with pytest.raises(RewardError, match=r"reward tests.rewards.user_rewards:shaky failed on sample 1 \(record p:1\)"
                                          r": raised RuntimeError: parser crashed"):
        RewardSet([RewardTerm("tests.rewards.user_rewards:shaky")]).score(completions, records)
    lenient = RewardSet([RewardTerm("tests.rewards.user_rewards:shaky", on_error="fallback", fallback=-1.0)])
    result = lenient.score(completions, records)
    assert result.total == [0.5, -1.0, -1.0, 0.5] and result.failures["tests.rewards.user_rewards:shaky"] == 2
    with pytest.raises(RewardError, match="sample 2 .*returned nan"):
        RewardSet([RewardTerm("tests.rewards.user_rewards:shaky")]).score(["fine", "fine", "nan"], records[:3])
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        RewardSet([RewardTerm("tests.rewards.user_rewards:too_few")]).score(["a", "b"], records[:2])
    with pytest.raises(ValueError, match="neither a built-in"):
        RewardSet([RewardTerm("no_such_reward")])


def test_options_must_fit_the_function():
    with pytest.raises(ValueError, match="reward numeric: options {'tolerance': 0.01} do not fit numeric"):
        RewardSet([RewardTerm("numeric", options={"tolerance": 0.01})])  # the option is rel_tol
    with pytest.raises(ValueError, match="format_match.*pattern"):
        RewardSet([RewardTerm("format_match")])  # a required option left out
    RewardSet([RewardTerm("numeric", options={"rel_tol": 0.01}),  # known options, and any for **options
               RewardTerm("tests.rewards.user_rewards:shaky", options={"anything": 1})])


def test_a_reward_call_past_its_time_limit_fails_its_batch_and_the_job_goes_on():
    """A verifier that never answers: under on_error raise the job stops naming it and the
    limit; under fallback the batch's samples get the fallback and are counted, and the
    next batch is scored as usual (the stalled call is left in a daemon thread)."""
    import time

    records = [record("a", i) for i in range(3)]
    stalls = "tests.rewards.user_rewards:stalls"
    started = time.perf_counter()
    with pytest.raises(RewardError, match=r"stalls failed on sample 0 \(record p:0\): the batch call took "
                                          r"longer than 0.2 s \(timeout_s\)"):
        RewardSet([RewardTerm(stalls, timeout_s=0.2, options={"seconds": 2.0})]).score(["ok", "stall", "ok"],
                                                                                       records)
    lenient = RewardSet([RewardTerm(stalls, timeout_s=0.2, options={"seconds": 2.0}, on_error="fallback",
                                    fallback=-1.0), RewardTerm("exact_match")])
    result = lenient.score(["a", "stall", "b"], records)
    assert result.terms[stalls] == [-1.0, -1.0, -1.0] and result.failures[stalls] == 3
    assert result.total == [0.0, -1.0, -1.0]  # exact_match still scored: 1 + -1, 0 + -1, 0 + -1
    assert time.perf_counter() - started < 1.5  # neither call waited for the stalled function
    assert lenient.score(["a", "a"], records[:2]).total == [2.0, 2.0] and not \
        lenient.score(["a"], records[:1]).failures
    from vlrlhf.config import RewardTermSpec

    assert RewardTermSpec(function="exact_match").timeout_s == 60.0  # the default limit a spec gets


def test_a_prompt_without_an_answer_is_a_named_failure_of_a_rule_reward():
    unanswered = [record(None, 0), record("red", 1)]
    with pytest.raises(RewardError, match=r"exact_match failed on sample 0 \(record p:0\): raised ValueError: "
                                          r"record p:0 has no answer for a rule reward"):
        RewardSet([RewardTerm("exact_match")]).score(["red", "red"], unanswered)
    result = RewardSet([RewardTerm("exact_match", on_error="fallback", fallback=0.0)]).score(["red", "red"],
                                                                                             unanswered)
    assert result.total == [0.0, 1.0] and result.failures["exact_match"] == 1
