"""Both rule sets (official, vlmevalkit) on hand-made files, against values worked out by hand
from each rule (VLMEvalKit: YOrN_Extraction, can_infer, POPE/Hallusion/AMBER ratings, report_acc)."""

from __future__ import annotations

import pytest

from tests.eval.fixtures import png_b64, write
from vlrlhf.data.reader import BadRecordError, BadRecords
from vlrlhf.eval import extract, vlmevalkit
from vlrlhf.eval.benchmarks import get_benchmark
from vlrlhf.eval.benchmarks.mmmu import parse_choice
from vlrlhf.eval.tsv import TSVError

ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def scored(tmp_path, name, rules, rows, predictions, bad=None):
    bench = get_benchmark(name, rules)
    items = bench.read(write(tmp_path / f"{name}.tsv", rows), bad)
    return bench.score(items, {str(k): v for k, v in predictions.items()})


# ---------------------------------------------------------------- answer reading

@pytest.mark.parametrize("answer, official, kit", [
    ("Yes, there is.", "yes", "yes"),
    ("**Yes**", "yes", None),  # VLMEvalKit keeps '*': the word is '**yes**'
    ("Yes:", "yes", None),  # ... and ':'
    ("'no'", "no", None),  # ... and "'"
    ("(yes)2,000", "yes", None),  # a digit,digit: marks are deleted, not spaced: 'yes2000'
    ("Yes and no", None, None),
])
def test_yes_no_by_both_rules(answer, official, kit):
    assert extract.yes_no(answer) == official and vlmevalkit.yes_no(answer) == kit


@pytest.mark.parametrize("answer, options, official, kit", [
    ("It could be A or B", ANIMALS, None, None),  # issue #17: two letters are ambiguous (was read as B)
    ("I think it is B", ANIMALS, "B", "B"),
    ("B is right, I think so", ANIMALS, "B", None),  # VLMEvalKit wants the letter among the last 4 tokens
    ("The correct answer is **C**, as it swims and flies and more words follow here", ANIMALS, "C", "C"),
    ("A cat is on the left", {"A": "dog", "B": "cat"}, "B", None),  # 'A' as an article; too long for texts
    ("a small fish", ANIMALS, "D", "D"),  # a unique option text
    ("Cannot determine the answer", ANIMALS, "Z", "Z"),
    ("Z", ANIMALS, None, "Z"),
])
def test_option_letter_by_both_rules(answer, options, official, kit):
    assert extract.choice_letter(answer, options) == official
    assert vlmevalkit.choice_letter(answer, options) == kit


def test_mmmu_parser_wants_spaces_on_both_sides_of_a_letter():
    # issue #17: 'DNA based' holds 'A ' but not ' A ': MMMU's parser finds nothing and falls back
    import random

    letter, parsed = parse_choice("It is DNA based", ANIMALS, random.Random(0))
    assert not parsed and letter in ANIMALS
    assert parse_choice("I pick A here", ANIMALS, random.Random(0)) == ("A", True)


# ---------------------------------------------------------------- POPE

def test_pope_row_in_two_splits_counts_in_each(tmp_path):
    image = png_b64()
    rows = [{"index": 0, "image": image, "question": "Is there a dog?", "answer": "Yes",
             "category": "adversarial,popular"},
            {"index": 1, "image": image, "question": "Is there a cat?", "answer": "No", "category": "random"}]
    for rules in ("official", "vlmevalkit"):
        m = scored(tmp_path, "pope", rules, rows, {0: "Yes", 1: "Yes"}).metrics
        assert m["adversarial/accuracy"] == 100.0 and m["popular/accuracy"] == 100.0 and m["random/accuracy"] == 0.0
        assert not any(key.startswith("adversarial,popular") for key in m)
        # overall pools the split rows (TP 2, FP 1): precision 2/3, recall 1, F1 0.8
        assert m["f1"] == pytest.approx(80.0) and m["accuracy"] == pytest.approx(200 / 3)


def test_pope_first_sentence_rule_against_vlmevalkit_reading(tmp_path):
    image = png_b64()
    truths = ["no", "yes", "no", "yes"]
    rows = [{"index": i, "image": image, "question": "Is there a dog?", "answer": t, "category": "random"}
            for i, t in enumerate(truths)]
    predictions = {0: "There is no dog. Yes.", 1: "I see a dog", 2: "**No**", 3: "Yes"}
    official = scored(tmp_path, "pope", "official", rows, predictions)
    # first sentences: no, yes, yes ('**No**' is not the word No), yes: TP 2, FP 1, FN 0, TN 1
    assert official.metrics["accuracy"] == 75.0 and official.metrics["f1"] == pytest.approx(80.0)
    assert official.metrics["yes_ratio"] == 75.0
    kit = scored(tmp_path, "pope", "vlmevalkit", rows, predictions)
    # unknown, unknown, unknown, yes: wrong, and 'not yes' for precision/recall: TP 1, FN 1
    assert kit.metrics["accuracy"] == 25.0 and kit.metrics["precision"] == 100.0 and kit.metrics["recall"] == 50.0
    assert kit.metrics["f1"] == pytest.approx(200 / 3) and kit.counts == {"items": 4, "unparsed": 3}


# ---------------------------------------------------------------- HallusionBench

def test_hallusionbench_ids_from_the_index_when_columns_are_absent(tmp_path):
    image = png_b64()
    base = {"image": image, "question": "q", "category": "VD", "l2-category": "chart"}
    rows = [{"index": "VD_chart_1_0_0_0", "answer": "Yes", **base},  # set 0, figure 0, question 0
            {"index": "VD_chart_2_0_0_1", "answer": "No", **base},  # set 0, figure 0, question 1
            {"index": "VD_chart_3_0_1_0", "answer": "No", **base}]  # set 0, figure 1, question 0
    predictions = {"VD_chart_1_0_0_0": "Yes", "VD_chart_2_0_0_1": "No", "VD_chart_3_0_1_0": "Yes"}
    for rules in ("official", "vlmevalkit"):
        m = scored(tmp_path, "hallusionbench", rules, rows, predictions).metrics
        # figures: (0,0) both right, (0,1) wrong; questions: (0,0) one wrong, (0,1) right
        assert (m["aAcc"], m["fAcc"], m["qAcc"]) == (pytest.approx(200 / 3), 50.0, 50.0)


def test_hallusionbench_required_columns_and_rows_without_ids(tmp_path):
    row = {"index": "VD_chart_1_0_0_0", "image": png_b64(), "question": "q", "answer": "Yes", "category": "VD"}
    with pytest.raises(TSVError, match="missing column.*l2-category"):
        get_benchmark("hallusionbench").read(write(tmp_path / "a.tsv", [row]))
    path = write(tmp_path / "b.tsv", [{**row, "l2-category": "chart", "index": "17"}])
    with pytest.raises(BadRecordError, match="no_ids"):
        get_benchmark("hallusionbench").read(path)
    bad = BadRecords("skip")
    assert get_benchmark("hallusionbench").read(path, bad) == [] and bad.counts == {"no_ids": 1}


def test_hallusionbench_groups_and_images_by_both_rules(tmp_path):
    image = png_b64()
    rows = [{"index": "VD_chart_1_0_0_0", "image": image, "answer": "Yes", "category": "VD"},
            {"index": "VS_chart_2_0_0_0", "image": image, "answer": "No", "category": "VS"},
            {"index": "VS_chart_3_0_1_0", "image": "", "answer": "Yes", "category": "VS"}]  # no figure
    rows = [{**row, "question": "q", "l2-category": "chart"} for row in rows]
    predictions = {"VD_chart_1_0_0_0": "Yes", "VS_chart_2_0_0_0": "**No**", "VS_chart_3_0_1_0": "No"}
    bench = get_benchmark("hallusionbench")
    items = bench.read(write(tmp_path / "h.tsv", rows))
    assert items[0].images and not items[2].images  # images load; the third is a text-only question
    official = bench.score(items, predictions)
    # right, right, wrong. Figures (category, l2, set, figure): VD/0/0, VS/0/0 right, VS/0/1 wrong;
    # questions (category, l2, set, question): VD/0/0 right, VS/0/0 has a wrong row
    assert official.metrics == {"aAcc": pytest.approx(200 / 3), "fAcc": pytest.approx(200 / 3), "qAcc": 50.0}
    bad = BadRecords("raise")
    kit = scored(tmp_path, "hallusionbench", "vlmevalkit", rows, predictions, bad)
    # the row without an image is dropped; '**No**' is unknown: right, wrong.
    # figure and question (l2, set, id) chart/0/0 hold both rows: wrong
    assert kit.counts == {"items": 2, "unparsed": 1} and bad.dropped_by_rule == {"no image (rules=vlmevalkit)": 1}
    assert kit.metrics == {"aAcc": 50.0, "fAcc": 0.0, "qAcc": 0.0,
                           "category/VD/aAcc": 100.0, "category/VD/fAcc": 100.0, "category/VD/qAcc": 100.0,
                           "category/VS/aAcc": 0.0, "category/VS/fAcc": 0.0, "category/VS/qAcc": 0.0,
                           "l2-category/chart/aAcc": 50.0, "l2-category/chart/fAcc": 0.0,
                           "l2-category/chart/qAcc": 0.0}


# ---------------------------------------------------------------- MME, MMBench, SEED-Bench, MMMU, AMBER

def test_mme_reading_and_rows_without_an_image(tmp_path):
    rows = [{"index": 0, "image": png_b64(), "question": "Is it red?", "answer": "Yes", "category": "color"},
            {"index": 1, "image": "0", "question": "Is it blue?", "answer": "No", "category": "color"},
            {"index": 2, "image": "", "question": "Is it green?", "answer": "No", "category": "color"}]
    predictions = {0: "**Yes**", 1: "No.", 2: "No"}
    with pytest.raises(BadRecordError, match="empty_cell"):  # official: a row without its image is bad
        scored(tmp_path, "mme", "official", rows, predictions)
    assert scored(tmp_path, "mme", "official", rows[:2], predictions).metrics["color"] == 200.0
    kit = scored(tmp_path, "mme", "vlmevalkit", rows, predictions)  # row 2 dropped; '**Yes**' unknown
    assert (kit.metrics["color/acc"], kit.metrics["color/acc+"], kit.metrics["perception"]) == (50.0, 0.0, 50.0)
    assert kit.counts == {"items": 2, "unparsed": 1}


def test_mmbench_circular_by_both_rules(tmp_path):
    image = png_b64()
    rotated = {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    base = {"image": image, "question": "Which animal?", "l2-category": "perception"}
    rows = [{"index": 0, **ANIMALS, "answer": "B", "category": "attr", **base},
            {"index": 1_000_000, **rotated, "answer": "A", "category": "attr", **base},
            {"index": 1, **ANIMALS, "answer": "B", "category": "attr", **base},
            {"index": 2, **ANIMALS, "answer": "C", "category": "count", **base},
            {"index": 3, **ANIMALS, "answer": "D", "category": "count", **base}]
    predictions = {0: "B is right, I think so", 1_000_000: "A", 1: "It could be A or B", 2: "I think it is C",
                   3: "a small fish"}
    official = scored(tmp_path, "mmbench", "official", rows, predictions)
    # questions 0, 2, 3 right; question 1 ambiguous
    assert official.metrics == {"overall": 75.0, "category/attr": 50.0, "category/count": 100.0,
                                "l2-category/perception": 75.0, "vanilla": 80.0}
    assert official.counts == {"items": 5, "unparsed": 1, "refused": 0, "questions": 4}
    kit = scored(tmp_path, "mmbench", "vlmevalkit", rows, predictions)
    # question 0 fails too: its first rotation names B as the first of six tokens
    assert kit.metrics == {"overall": 50.0, "category/attr": 0.0, "category/count": 100.0,
                           "l2-category/perception": 50.0, "vanilla": 60.0}
    assert kit.counts == {"items": 5, "unparsed": 2, "refused": 0, "questions": 4}


def test_seedbench_report_by_both_rules(tmp_path):
    image = png_b64()
    rows = [{"index": 0, "answer": "A", "category": "scene", "l2-category": "L1", "split": "a"},
            {"index": 1, "answer": "B", "category": "scene", "l2-category": "L1", "split": "b"},
            {"index": 2, "answer": "A", "category": "count", "l2-category": "L2", "split": "b"}]
    rows = [{**row, "image": image, "question": "q", "A": "cat", "B": "dog", "C": "fish"} for row in rows]
    predictions = {0: "A", 1: "(B) dog", 2: "C"}
    assert scored(tmp_path, "seedbench", "official", rows, predictions).metrics == {
        "overall": pytest.approx(200 / 3), "category/count": 0.0, "category/scene": 100.0}
    assert scored(tmp_path, "seedbench", "vlmevalkit", rows, predictions).metrics == {
        "overall": pytest.approx(200 / 3), "category/count": 0.0, "category/scene": 100.0,
        "l2-category/L1": 100.0, "l2-category/L2": 0.0,
        "split/a/overall": 100.0, "split/a/category/scene": 100.0, "split/a/l2-category/L1": 100.0,
        "split/b/overall": 50.0, "split/b/category/count": 0.0, "split/b/category/scene": 100.0,
        "split/b/l2-category/L1": 100.0, "split/b/l2-category/L2": 0.0}


def test_mmmu_by_both_rules(tmp_path):
    image = png_b64()
    choice = {"question_type": "multiple-choice", "category": "Art", "l2-category": "Humanities", **ANIMALS}
    open_ = {"question_type": "open", "category": "Math", "l2-category": "Science"}
    rows = [{"index": "m1", "answer": "B", **choice}, {"index": "m2", "answer": "C", **choice},
            {"index": "o1", "answer": "3.5", **open_}, {"index": "o2", "answer": "Paris", **open_},
            {"index": "o3", "answer": "8", **open_}]
    rows = [{"image": image, "question": "q", **row} for row in rows]
    predictions = {"m1": "(B) dog", "m2": "I choose C since birds fly, and the others do not fly at all",
                   "o1": "3.5", "o2": "It is Paris.", "o3": "So x = 7"}
    official = scored(tmp_path, "mmmu", "official", rows, predictions)
    assert official.metrics == {"overall": 80.0, "category/Art": 100.0, "category/Math": pytest.approx(200 / 3)}
    assert official.counts == {"items": 5, "random_fallback": 0}
    kit = scored(tmp_path, "mmmu", "vlmevalkit", rows, predictions)
    # m2: C is the 3rd of 14 tokens and the answer is too long for option texts: unparsed.
    # Open questions become A = the gold answer, B = 'Other Answers': o1, o2 read as A; o3 unparsed
    assert kit.metrics == {"overall": 60.0, "category/Art": 50.0, "category/Math": pytest.approx(200 / 3),
                           "l2-category/Humanities": 50.0, "l2-category/Science": pytest.approx(200 / 3)}
    assert kit.counts == {"items": 5, "unparsed": 2}


def test_amber_avg_accuracy_is_the_mean_of_dimensions(tmp_path):
    cases = [("discriminative-hallucination", "no", "No"), ("discriminative-hallucination", "yes", "**Yes**"),
             ("discriminative-attribute-state", "no", "no"), ("discriminative-attribute-number", "yes", "No"),
             ("discriminative-relation", "yes", "Yes"), ("discriminative-relation", "no", "Yes"),
             ("discriminative-relation", "no", "No")]
    rows = [{"index": i, "image": png_b64(), "question": "Is there a cat?", "answer": truth, "category": kind}
            for i, (kind, truth, _) in enumerate(cases)]
    predictions = {i: answer for i, (_, _, answer) in enumerate(cases)}
    official = scored(tmp_path, "amber", "official", rows, predictions)
    m = official.metrics
    assert (m["existence/accuracy"], m["attribute/accuracy"]) == (100.0, 50.0)
    assert m["relation/accuracy"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(500 / 7)
    assert m["f1"] == 75.0 and official.headline == "f1" and "avg_accuracy" not in m  # 'no' positive: 3 of 4
    kit = scored(tmp_path, "amber", "vlmevalkit", rows, predictions)
    m = kit.metrics
    assert (m["existence/accuracy"], m["attribute/accuracy"]) == (50.0, 50.0)  # '**Yes**' is unknown
    assert m["avg_accuracy"] == pytest.approx((50 + 50 + 200 / 3) / 3) and kit.headline == "avg_accuracy"
    assert m["accuracy"] == pytest.approx(400 / 7)  # over questions: not what VLMEvalKit reports


def test_unknown_rules_are_rejected():
    with pytest.raises(ValueError, match="rules='lmms' is not one of official, vlmevalkit"):
        get_benchmark("mme", "lmms")


def test_rules_in_the_eval_spec_and_in_compare(tmp_path):
    import json

    from jobs.evaluate import compare
    from vlrlhf.config import SpecError
    from vlrlhf.eval.spec import load_eval_spec

    (tmp_path / "config.json").write_text("{}")
    flags = [f"model.path={tmp_path}", "benchmarks=mme", f"data={tmp_path}"]
    assert load_eval_spec(None, flags).rules == "official"
    assert load_eval_spec(None, flags + ["rules=vlmevalkit"]).rules == "vlmevalkit"
    with pytest.raises(SpecError, match="rules: must be one of 'official' or 'vlmevalkit'"):
        load_eval_spec(None, flags + ["rules=lmms"])
    for name, rules in (("a", "official"), ("b", "vlmevalkit")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scores.json").write_text(json.dumps({"model": name, "rules": rules, "benchmarks": {}}))
    assert "warning: A was scored with rules=official, B with rules=vlmevalkit" in compare(tmp_path / "a",
                                                                                           tmp_path / "b")
