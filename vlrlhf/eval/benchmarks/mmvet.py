"""MM-Vet (Yu+ 2023): open answers graded 0.0-1.0 by a judge model.

The grading prompt keeps MM-Vet's structure: the rule for `<AND>` (every element of
the ground truth must be present) and `<OR>` (any one suffices), the 0.0-1.0 scale in
steps of 0.1, a few-shot table of question | ground truth | prediction | correctness
and the item as its last row with the score left blank. A reply without a score in
[0, 1] is asked again (the judge retries); an item the judge never scores is
reported as unscored, not as zero. Total and per capability (column `capability`,
comma-separated, or `category`) are mean scores in percent.
"""

from __future__ import annotations

import re
from collections import defaultdict

from vlrlhf.eval.benchmarks.base import Benchmark, Score, prediction_of

INSTRUCTIONS = (
    "Compare the ground truth and the prediction of an AI model and give a correctness score for the prediction. "
    "<AND> in the ground truth means the prediction is fully right only if it contains every element; <OR> means "
    "it is fully right if it contains any one of them. The score is one of 0.0 (fully wrong), 0.1, 0.2, 0.3, 0.4, "
    "0.5, 0.6, 0.7, 0.8, 0.9 or 1.0 (fully right). Fill in only the last correctness cell.")
SHOTS = (
    ("What is x in the equation?", "-1 <AND> -5", "x = 3", "0.0"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -1", "0.5"),
    ("What is x in the equation?", "-1 <AND> -5", "x = -5 or x = -1", "1.0"),
    ("Which fruit is on the left?", "apple <OR> red apple", "It is an apple.", "1.0"),
    ("How many birds are there?", "3", "There are two birds and a cat.", "0.0"),
)


def cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def grading_prompt(question: str, truth: str, prediction: str) -> str:
    rows = [f"{cell(q)} | {cell(t)} | {cell(p)} | {s}" for q, t, p, s in SHOTS]
    rows.append(f"{cell(question)} | {cell(truth)} | {cell(prediction)} |")
    return "\n".join([INSTRUCTIONS, "", "Question | Ground truth | Prediction | Correctness",
                      "--- | --- | --- | ---", *rows])


def parse_score(reply: str) -> float | None:
    match = re.search(r"(?<![\d.])(0(?:\.\d+)?|1(?:\.0+)?)(?![\d.])", reply.strip())
    if not match:
        return None
    value = float(match.group(1))
    return round(value, 1) if 0.0 <= value <= 1.0 else None


class MMVet(Benchmark):
    name = "mmvet"
    files = ("MMVet", "MM-Vet")
    needs_judge = True

    def capabilities(self, item) -> list[str]:
        raw = item.get("capability") or item.get("category") or "all"
        return [part.strip() for part in raw.split(",") if part.strip()]

    def score(self, items, predictions, judge=None) -> Score:
        prompts = [grading_prompt(item.question, item.answer, prediction_of(predictions, item)) for item in items]
        grades = judge.ask_many(prompts, parse_score) if judge is not None else [None] * len(items)
        details, sums, counts = [], defaultdict(float), defaultdict(int)
        for item, grade in zip(items, grades, strict=True):
            details.append({"index": item.index, "prediction": predictions[item.index], "score": grade,
                            "correct": grade == 1.0, "capability": ",".join(self.capabilities(item))})
            if grade is None:
                continue
            for name in ["total", *self.capabilities(item)]:
                sums[name] += grade
                counts[name] += 1
        metrics = {name: 100.0 * sums[name] / counts[name] for name in sorted(counts)}
        unscored = [d["index"] for d in details if d["score"] is None]
        return Score(self.name, "total", metrics, details, {"items": len(details), "unscored": len(unscored)})
