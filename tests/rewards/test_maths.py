"""The `math` reward: reading the final answer, symbolic equivalence, and the time limit per check."""

from __future__ import annotations

import time

import pytest

from tests.rewards.test_rewards import record
from vlrlhf.rewards import RewardSet, RewardTerm
from vlrlhf.rewards.builtin import numeric
from vlrlhf.rewards.maths import CHECKER, final_answer, last_boxed, math

# (completion, reference answer, expected reward), each written from the maths
CASES = [
    # fractions, decimals and their spellings
    (r"so the ratio is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\tfrac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac{2}{3}}", "0.5", 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", "-0.5", 0.0),
    # roots
    (r"the side is \boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{18}", 1.0),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1.0),
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}", 0.0),
    (r"\boxed{\sqrt[3]{8}}", "2", 1.0),
    # degrees and units of angle
    (r"the angle is \boxed{45^\circ}", "45", 1.0),
    (r"\boxed{45^{\circ}}", r"45^\circ", 1.0),
    (r"\boxed{60^\circ}", "45", 0.0),
    # percentages
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{25\%}", "25", 1.0),
    # integers and plain numbers
    (r"\boxed{12}", "12", 1.0),
    (r"\boxed{12}", "13", 0.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    (r"\boxed{7}", "-7", 0.0),
    (r"\boxed{3.0}", "3", 1.0),
    # equations and symbols
    (r"solving gives \boxed{x=3}", "3", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{x=4}", "3", 0.0),
    (r"\boxed{2\pi}", r"2\pi", 1.0),
    (r"\boxed{\pi \cdot 2}", r"2\pi", 1.0),
    (r"\boxed{6.28}", r"2\pi", 0.0),  # a rounded value is not the exact answer
    (r"\boxed{2x+2}", "2(x+1)", 1.0),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
    (r"\boxed{x^2+1}", "(x-1)(x+1)", 0.0),
    # intervals and sets
    (r"\boxed{(1,2]}", "(1,2]", 1.0),
    (r"\boxed{[1,2]}", "(1,2]", 0.0),
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", 1.0),
    # where the answer is read: the last box, nested braces, no box
    (r"first \boxed{4}, then on reflection \boxed{5}", "5", 1.0),
    (r"first \boxed{5}, then on reflection \boxed{4}", "5", 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    ("the answer is 12", "12", 0.0),  # no final answer given
    (r"\boxed{", "12", 0.0),  # an unclosed box
    (r"\boxed{}", "12", 0.0),
    (r"\boxed{banana}", "12", 0.0),
]


def test_the_table():
    completions = [completion for completion, _, _ in CASES]
    records = [record(answer, index) for index, (_, answer, _) in enumerate(CASES)]
    got = math(completions, records)
    wrong = [(c, a, e, g) for (c, a, e), g in zip(CASES, got, strict=True) if g != e]
    assert not wrong, wrong
    assert len(CASES) >= 40


def test_where_the_last_number_reader_is_wrong():
    """`numeric` reads the last number: it fails fractions, roots, x=3 (it reads 3, fine) and
    degrees written with a superscript; `math` gets them right."""
    cases = [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
             (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}")]
    records = [record(answer, index) for index, (_, answer) in enumerate(cases)]
    assert math([c for c, _ in cases], records) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):  # the reference itself is not a plain number
        numeric([c for c, _ in cases], records)
    assert numeric([r"\boxed{\frac{1}{2}}"], [record("0.5")]) == [0.0]  # it reads the 2
    assert numeric([r"\boxed{45^\circ}"], [record("45")]) == [1.0]
    assert numeric([r"so 3 triangles: \boxed{4}"], [record("3")]) == [0.0] == math([r"so 3 triangles: \boxed{4}"],
                                                                                    [record("3")])


def test_reading_the_answer():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \fbox{7}") == "7"
    assert last_boxed(r"\boxed {x}") == "x"
    assert last_boxed("no box") is None and last_boxed(r"\boxed{1") is None
    assert final_answer(r"<think>2+2=\boxed{5}?</think><answer>4</answer>", "<answer>") == "4"
    assert final_answer(r"<answer>\boxed{4} apples</answer> trailing", "<answer>") == "4"
    assert final_answer("Answer: 42", "Answer:") == "42"
    assert final_answer(r"<think>\boxed{4}</think>", "<answer>") is None
    assert math([r"<think>...</think><answer>\frac{1}{2}</answer>", r"<answer>3</answer>"],
                [record("0.5"), record("0.5", 1)], marker="<answer>") == [1.0, 0.0]


def test_a_pathological_check_is_cut_off_and_the_rest_of_the_batch_is_scored(capfd):
    completions = [r"\boxed{2}", r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{\frac{1}{2}}"]
    records = [record("2", 0), record("3", 1), record("0.5", 2)]
    math(completions[:1], records[:1])  # a warm checker: the limit then counts only the check
    before, start = CHECKER.timeouts, time.perf_counter()
    assert math(completions, records, check_timeout_s=1.0) == [1.0, 0.0, 1.0]
    assert time.perf_counter() - start < 20  # the 1 s limit, the restart of the checker and its imports
    assert CHECKER.timeouts == before + 1
    assert "the check of record p:1 (sample 1) ran past 1 s (scored 0)" in capfd.readouterr().err


def test_it_composes_with_the_format_reward():
    rewards = RewardSet([RewardTerm("math"), RewardTerm("format_match", weight=0.5,
                                                        options={"pattern": r"<think>.*</think>.*\\boxed\{.*\}.*"})])
    result = rewards.score([r"<think>half</think> \boxed{\frac{1}{2}}", r"\boxed{0.5}", r"<think>x</think> 0.5",
                            r"<think>x</think> \boxed{2}"], [record("0.5", i) for i in range(4)])
    assert result.total == [1.5, 1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="do not fit math"):
        RewardSet([RewardTerm("math", options={"timeout": 3})])
    with pytest.raises(ValueError, match="has no answer"):
        math([r"\boxed{1}"], [record(None)])
