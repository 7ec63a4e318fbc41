"""The geometry3k format and the bundled synthetic geometry problems."""

from __future__ import annotations

import json
import math as pymath
import pathlib
import re

import pytest

from vlrlhf.bundle import bundle_root
from vlrlhf.data.formats import FormatContext, RecordError, geometry3k
from vlrlhf.data.geometry import INSTRUCTION, square_root_form, synthesize_geometry
from vlrlhf.rewards.maths import math

BUNDLED = bundle_root() / "data" / "geometry"


def formula(problem: str) -> float:
    """The answer from the numbers in the problem, computed here independently of the generator."""
    numbers = [int(n) for n in re.findall(r"\d+", problem)]
    if "both legs" in problem:
        return numbers[0] * pymath.sqrt(2)
    if "legs are" in problem:
        return pymath.hypot(*numbers)
    if "angles" in problem:
        return 180 - sum(numbers)
    if "equilateral" in problem:
        return pymath.sqrt(3) / 4 * numbers[0] ** 2
    if "rectangle" in problem:
        return numbers[0] * numbers[1]
    raise AssertionError(problem)


def test_the_bundled_answers_follow_from_the_problems_and_regenerate(tmp_path):
    from math_verify import parse

    rows = [json.loads(line) for line in (BUNDLED / "geometry.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all((BUNDLED / row["images"][0]).is_file() for row in rows)
    for row in rows:
        value = float(parse(f"\\boxed{{{row['answer']}}}", parsing_timeout=None)[0].evalf())
        assert value == pytest.approx(formula(row["problem"]), rel=1e-9), row
    synthesize_geometry(tmp_path)  # the bundled set is what the generator writes for seed 0
    for name in ("geometry.jsonl", "test_geometry.jsonl", "geometry_sft.json", "images/train/00007.png"):
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), name


def test_square_root_form():
    assert [square_root_form(n) for n in (2, 8, 12, 16, 18, 50, 72, 7)] == [
        r"\sqrt{2}", r"2\sqrt{2}", r"2\sqrt{3}", "4", r"3\sqrt{2}", r"5\sqrt{2}", r"6\sqrt{2}", r"\sqrt{7}"]


def test_the_worked_answers_of_the_cold_start_score_one():
    sft = json.loads((BUNDLED / "geometry_sft.json").read_text())
    prompts = [record for line in (BUNDLED / "geometry.jsonl").read_text().splitlines()
               for record in geometry3k(json.loads(line), FormatContext())]
    completions = [row["conversations"][1]["value"] for row in sft]
    assert math(completions, prompts) == [1.0] * len(prompts)
    shifted = completions[1:] + completions[:1]  # the answers of other problems are mostly wrong
    assert sum(math(shifted, prompts)) < len(prompts) / 2


def test_the_format_reads_geometry3k_and_verl_rows():
    image = pathlib.Path("images/train/00000.png")
    (record,) = geometry3k({"images": [str(image)], "problem": "<image>Find x.", "answer": 5}, FormatContext())
    assert record.prompt[0].content == f"<image>Find x. {INSTRUCTION}" and record.answer == "5"
    assert record.images == [str(image)]
    (plain,) = geometry3k({"images": [{"bytes": b"png"}], "problem": "Find x.", "answer": "5"},
                          FormatContext(options={"instruction": ""}))
    assert plain.prompt[0].content == "<image>\nFind x." and plain.images == [b"png"]
    (verl,) = geometry3k({"images": [str(image)], "prompt": [{"role": "user", "content": "<image>Find y."}],
                          "reward_model": {"ground_truth": r"\frac{1}{2}"}, "data_source": "geo3k"}, FormatContext())
    assert verl.prompt[0].content == "<image>Find y." and verl.answer == r"\frac{1}{2}"
    assert verl.metadata == {"reward_model": {"ground_truth": r"\frac{1}{2}"}, "data_source": "geo3k"}
    with pytest.raises(RecordError, match="missing field 'answer'"):
        geometry3k({"images": [], "problem": "Find x."}, FormatContext())
    with pytest.raises(RecordError, match="placeholder|image"):
        geometry3k({"images": [str(image)], "problem": "<image><image>Find x.", "answer": "1"}, FormatContext())
