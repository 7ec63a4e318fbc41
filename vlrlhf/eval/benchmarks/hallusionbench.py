"""HallusionBench (Guan+ 2024): yes/no questions on original and edited figures.

aAcc: questions answered right. fAcc: figures (l2-category, category, set_id,
figure_id) whose every question is right. qAcc: questions (l2-category, category,
set_id, question_id) right on every figure variant. Answers '1'/'0' or yes/no; an
answer without exactly one of yes/no is wrong (counted). Rows may have no image.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of, yes_no_prompt
from vlrlhf.eval.extract import yes_no

TRUTH = {"1": "yes", "0": "no", "yes": "yes", "no": "no"}


def group_accuracy(details: list[dict], fields: tuple[str, ...]) -> float:
    groups = defaultdict(list)
    for detail in details:
        groups[tuple(detail[f] for f in fields)].append(detail["correct"])
    return percent(sum(all(v) for v in groups.values()), len(groups))


class HallusionBench(Benchmark):
    name = "hallusionbench"
    files = ("HallusionBench",)
    needs_image = False  # some questions come without a figure

    def prompt(self, item) -> str:
        return yes_no_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details = []
        for item in items:
            prediction = prediction_of(predictions, item)
            extracted = yes_no(prediction)
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": extracted is not None and extracted == TRUTH.get(item.answer.lower()),
                            **{f: item.get(f) for f in ("l2-category", "category", "set_id", "figure_id",
                                                         "question_id")}})
        metrics = {"aAcc": percent(sum(d["correct"] for d in details), len(details)),
                   "fAcc": group_accuracy(details, ("l2-category", "category", "set_id", "figure_id")),
                   "qAcc": group_accuracy(details, ("l2-category", "category", "set_id", "question_id"))}
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details)}
        return Score(self.name, "aAcc", metrics, details, counts)
