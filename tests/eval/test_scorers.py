"""Each scorer on hand-made files in the real layout, against hand-computed scores."""

from __future__ import annotations

import pytest

from tests.eval.fixtures import png_b64, write
from vlrlhf.eval.benchmarks import get_benchmark
from vlrlhf.eval.judge import NoJudge


def scored(tmp_path, name, rows, predictions, judge=None):
    bench = get_benchmark(name)
    items = bench.read(write(tmp_path / f"{name}.tsv", rows))
    return bench.score(items, {str(k): v for k, v in predictions.items()}, judge)


def test_mme_acc_acc_plus_and_totals(tmp_path):
    img = [png_b64((i * 40, 0, 0)) for i in range(4)]
    rows = [  # two questions per image; the second row's image cell is the first row's index
        {"index": 0, "image": img[0], "question": "Is there a dog?", "answer": "Yes", "category": "existence"},
        {"index": 1, "image": "0", "question": "Is there a cat?", "answer": "No", "category": "existence"},
        {"index": 2, "image": img[1], "question": "Is there a car?", "answer": "No", "category": "existence"},
        {"index": 3, "image": "2", "question": "Is there a bus?", "answer": "Yes", "category": "existence"},
        {"index": 4, "image": img[2], "question": "Does it say A?", "answer": "Yes", "category": "OCR"},
        {"index": 5, "image": "4", "question": "Does it say B?", "answer": "No", "category": "OCR"},
        {"index": 6, "image": img[3], "question": "Is it valid?", "answer": "Yes", "category": "code_reasoning"},
        {"index": 7, "image": "6", "question": "Does it print 2?", "answer": "No", "category": "code_reasoning"}]
    predictions = {0: "Yes", 1: "Yes, there is a cat.",  # image 0: one of two right
                   2: "No.", 3: "yes",  # image 1: both right
                   4: "yes and no", 5: "no",  # unparseable counts wrong
                   6: "Yes", 7: "No"}
    score = scored(tmp_path, "mme", rows, predictions)
    assert score.metrics["existence/acc"] == 75.0 and score.metrics["existence/acc+"] == 50.0
    assert score.metrics["existence"] == 125.0
    assert score.metrics["ocr"] == 50.0 + 0.0
    assert score.metrics["code_reasoning"] == 200.0
    assert score.metrics["perception"] == 175.0 and score.metrics["cognition"] == 200.0
    assert score.counts == {"items": 8, "unparsed": 1}


def test_mmbench_circular_groups_refusals_and_unparsed(tmp_path):
    image = png_b64()
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    rotated = {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    rows = [
        {"index": 0, "image": image, "question": "Which animal?", **options, "answer": "B", "category": "attr",
         "l2-category": "perception"},
        {"index": 1_000_000, "image": "0", "question": "Which animal?", **rotated, "answer": "A", "category": "attr",
         "l2-category": "perception"},
        {"index": 2_000_000, "image": "0", "question": "Which animal?", **options, "answer": "B", "category": "attr",
         "l2-category": "perception"},
        {"index": 1, "image": image, "question": "Which?", **options, "answer": "C", "category": "attr",
         "l2-category": "perception"},
        {"index": 1_000_001, "image": "1", "question": "Which?", **rotated, "answer": "B", "category": "attr",
         "l2-category": "perception"},
        {"index": 2, "image": image, "question": "How many?", **options, "answer": "A", "category": "count",
         "l2-category": "perception"},
        {"index": 3, "image": image, "question": "How many?", **options, "answer": "D", "category": "count",
         "l2-category": "perception"}]
    predictions = {0: "B", 1_000_000: "A. dog", 2_000_000: "The answer is C",  # one wrong rotation: group wrong
                   1: "(C)", 1_000_001: "It is a bird",  # every rotation right (option text counts)
                   2: "I cannot determine this from the image.",  # refusal -> Z
                   3: "purple"}  # unparseable
    score = scored(tmp_path, "mmbench", rows, predictions)
    assert score.metrics["overall"] == 25.0  # 1 of 4 questions
    assert score.metrics["category/attr"] == 50.0 and score.metrics["category/count"] == 0.0
    assert score.metrics["l2-category/perception"] == 25.0
    assert score.metrics["vanilla"] == pytest.approx(100 * 4 / 7)
    assert score.counts == {"items": 7, "unparsed": 1, "refused": 1, "questions": 4}
    assert [d["extracted"] for d in score.details] == ["B", "A", "C", "C", "B", "Z", None]


def test_seedbench_per_category(tmp_path):
    image = png_b64()
    rows = [{"index": i, "image": image, "question": "q", "A": "x", "B": "y", "answer": a, "category": c}
            for i, (a, c) in enumerate([("A", "scene"), ("B", "scene"), ("A", "count")])]
    score = scored(tmp_path, "seedbench", rows, {0: "A", 1: "A", 2: "A"})
    assert score.metrics == {"overall": pytest.approx(200 / 3), "category/count": 100.0, "category/scene": 50.0}


def test_pope_metrics_per_split_and_yes_ratio_from_predictions(tmp_path):
    image = png_b64()
    truths = [("yes", "random"), ("yes", "random"), ("yes", "random"), ("no", "random"),
              ("yes", "adversarial"), ("no", "adversarial")]
    rows = [{"index": i, "image": image, "question": "Is there a dog in the image?", "answer": t, "category": s}
            for i, (t, s) in enumerate(truths)]
    predictions = {0: "Yes.", 1: "No, there is not.", 2: "Yes", 3: "There is no dog.", 4: "I see a dog",
                   5: "not really"}
    score = scored(tmp_path, "pope", rows, predictions)
    m = score.metrics
    # random: TP 2, FN 1, TN 1, FP 0; yes-ratio of the predictions is 2/4 (the truth's is 3/4)
    assert (m["random/accuracy"], m["random/precision"], m["random/recall"]) == (75.0, 100.0, pytest.approx(200 / 3))
    assert m["random/f1"] == pytest.approx(80.0) and m["random/yes_ratio"] == 50.0
    assert m["adversarial/f1"] == 100.0 and m["adversarial/yes_ratio"] == 50.0
    # overall: TP 3, FN 1, TN 2, FP 0
    assert m["accuracy"] == pytest.approx(500 / 6) and m["recall"] == 75.0 and m["f1"] == pytest.approx(600 / 7)
    assert get_benchmark("pope").prompt(get_benchmark("pope").read(tmp_path / "pope.tsv")[0]).endswith(
        "Please answer yes or no.")


def test_mmmu_choice_rules_seeded_fallback_and_open_answers(tmp_path):
    image = png_b64()
    options = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    rows = [{"index": "m1", "image": image, "question": "q", **options, "answer": "B",
             "question_type": "multiple-choice"},
            {"index": "m2", "image": image, "question": "q", **options, "answer": "C",
             "question_type": "multiple-choice"},
            {"index": "m3", "image": image, "question": "q", **options, "answer": "A",
             "question_type": "multiple-choice"},
            {"index": "m4", "image": image, "question": "q", **options, "answer": "D",
             "question_type": "multiple-choice"},
            {"index": "o1", "image": image, "question": "q", "answer": "3.5", "question_type": "open"},
            {"index": "o2", "image": image, "question": "q", "answer": "['paris', 'Paris, France']",
             "question_type": "open"},
            {"index": "o3", "image": image, "question": "q", "answer": "8", "question_type": "open"}]
    predictions = {"m1": "The answer is (B).", "m2": "(A) is tempting, but (C) fits",  # several: the last one
                   "m3": "no idea", "m4": "Looking closely, the animal swimming there is a fish",  # option text
                   "o1": "Adding them, the result is 3.50.", "o2": "It is Paris.", "o3": "So x = 7"}
    score = scored(tmp_path, "mmmu", rows, predictions)
    details = {d["index"]: d for d in score.details}
    assert [details[k]["correct"] for k in ("m1", "m2", "m4", "o1", "o2", "o3")] == [True, True, True, True, True,
                                                                                     False]
    assert details["m3"]["random_fallback"] and score.counts["random_fallback"] == 1
    again = scored(tmp_path, "mmmu", rows, predictions)
    assert {d["index"]: d["extracted"] for d in again.details}["m3"] == details["m3"]["extracted"]  # seeded
    assert score.metrics["overall"] == pytest.approx(100 * (5 + details["m3"]["correct"]) / 7)


def test_mathvista_rules_per_answer_type(tmp_path):
    image = png_b64()
    rows = [
        {"index": 1, "image": image, "question": "How many?", "answer": "12", "question_type": "free_form",
         "answer_type": "integer", "task": "count"},
        {"index": 2, "image": image, "question": "Value?", "answer": "3.1", "question_type": "free_form",
         "answer_type": "float", "precision": "1", "task": "algebra"},
        {"index": 3, "image": image, "question": "Which?", "answer": "4", "question_type": "multi_choice",
         "answer_type": "text", "choices": "['2', '4', '6']", "task": "algebra"},
        {"index": 4, "image": image, "question": "List?", "answer": "[1, 2]", "question_type": "free_form",
         "answer_type": "list", "task": "algebra"},
        {"index": 5, "image": image, "question": "Shape?", "answer": "square", "question_type": "free_form",
         "answer_type": "text", "task": "geometry"},
        {"index": 6, "image": image, "question": "How many?", "answer": "7", "question_type": "free_form",
         "answer_type": "integer", "task": "count"}]
    predictions = {1: "There are 12 apples.", 2: "approximately 3.14", 3: "B", 4: "The list is [1, 2]",
                   5: "The answer is: Square.", 6: "I do not know"}
    score = scored(tmp_path, "mathvista", rows, predictions, NoJudge())
    assert [d["correct"] for d in score.details] == [True, True, True, True, True, False]
    assert score.counts["unparsed"] == 1 and score.metrics["task/count"] == 50.0
    assert score.metrics["overall"] == pytest.approx(500 / 6)


def test_hallusionbench_question_figure_and_all_accuracy(tmp_path):
    image = png_b64()
    base = {"l2-category": "VD", "category": "chart", "set_id": "0"}
    rows = [{"index": 0, "image": image, "question": "q0", "answer": "1", "figure_id": "0", "question_id": "0", **base},
            {"index": 1, "image": image, "question": "q1", "answer": "0", "figure_id": "0", "question_id": "1", **base},
            {"index": 2, "image": image, "question": "q0", "answer": "0", "figure_id": "1", "question_id": "0", **base},
            {"index": 3, "image": "", "question": "q1", "answer": "1", "figure_id": "1", "question_id": "1", **base}]
    score = scored(tmp_path, "hallusionbench", rows, {0: "Yes", 1: "No", 2: "Yes", 3: "yes"})
    assert score.metrics == {"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0}


def test_mmvet_without_a_judge_reports_every_item_unscored(tmp_path):
    rows = [{"index": 0, "image": png_b64(), "question": "What is x?", "answer": "-1 <AND> -5",
             "capability": "math,ocr"}]
    score = scored(tmp_path, "mmvet", rows, {0: "x = -1"}, NoJudge())
    assert score.counts == {"items": 1, "unscored": 1} and score.metrics == {}


def test_a_lost_prediction_is_an_error_not_a_miss(tmp_path):
    rows = [{"index": 0, "image": png_b64(), "question": "q", "answer": "Yes", "category": "existence"}]
    with pytest.raises(KeyError, match="no prediction for index 0"):
        scored(tmp_path, "mme", rows, {})


AMBER_CASES = [  # (type, truth, answer)
    ("discriminative-hallucination", "no", "No"), ("discriminative-hallucination", "yes", "Yes, there is."),
    ("discriminative-hallucination", "no", "Yes"), ("discriminative-attribute-state", "no", "No."),
    ("discriminative-attribute-state", "yes", "no"), ("discriminative-relation", "yes", "maybe")]


def check_amber(score):
    m = score.metrics
    # 'no' is AMBER's positive class: 3 answered no, 3 truly no, 2 both
    assert m["accuracy"] == 50.0 and m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert (m["existence/precision"], m["existence/recall"]) == (100.0, 50.0)
    assert m["existence/accuracy"] == pytest.approx(200 / 3) and m["existence/f1"] == pytest.approx(200 / 3)
    assert (m["attribute/precision"], m["attribute/recall"], m["attribute/accuracy"]) == (50.0, 100.0, 50.0)
    assert m["attribute-state/accuracy"] == 50.0 and m["relation/accuracy"] == 0.0
    assert score.counts == {"items": 6, "unparsed": 1}


def test_amber_discriminative_no_is_positive(tmp_path):
    rows = [{"index": i, "image": png_b64(), "question": "Is there a cat?", "answer": truth, "category": kind}
            for i, (kind, truth, _) in enumerate(AMBER_CASES)]
    check_amber(scored(tmp_path, "amber", rows, {i: answer for i, (_, _, answer) in enumerate(AMBER_CASES)}))


def test_amber_reads_its_official_release_folder(tmp_path):
    import base64
    import json

    folder = tmp_path / "AMBER"
    (folder / "data" / "query").mkdir(parents=True)
    (folder / "image").mkdir()
    queries, annotations = [], []
    for i, (kind, truth, _) in enumerate(AMBER_CASES, start=1):
        (folder / "image" / f"AMBER_{i}.jpg").write_bytes(base64.b64decode(png_b64()))
        queries.append({"id": i, "image": f"AMBER_{i}.jpg", "query": "Is there a cat in this image?"})
        annotations.append({"id": i, "type": kind, "truth": truth})
    (folder / "data" / "query" / "query_discriminative.json").write_text(json.dumps(queries))
    (folder / "data" / "annotations.json").write_text(json.dumps(annotations))
    bench = get_benchmark("amber")
    from vlrlhf.eval.benchmarks import find_file

    items = bench.read(find_file(bench, tmp_path))
    assert [i.index for i in items] == ["1", "2", "3", "4", "5", "6"] and items[0].images
    check_amber(bench.score(items, {str(i): answer for i, (_, _, answer) in enumerate(AMBER_CASES, start=1)}))
