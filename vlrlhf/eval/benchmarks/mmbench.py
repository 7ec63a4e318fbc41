"""MMBench (Liu+ 2023) with circular evaluation; SEED-Bench (image) as plain multiple choice.

MMBench rows that are rotations of one question (options shifted) share
`index % 1_000_000`; a question counts as right only if EVERY rotation is answered
right. The option is read from the free-form answer by `choice_letter` (refusal ->
'Z', 'answer is X', a single option letter, a unique option text); an unreadable
answer is wrong and counted. Accuracy overall, per `category` and per `l2-category`.

rules=vlmevalkit: options read by VLMEvalKit's exact matching (`vlrlhf.eval.vlmevalkit`);
SEED-Bench also reports `l2-category`, and both report per `split` when a file has several.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.eval import vlmevalkit
from vlrlhf.eval.benchmarks.base import Benchmark, Score, accuracy_by, multiple_choice_prompt, percent, prediction_of
from vlrlhf.eval.extract import REFUSAL, choice_letter

ROTATION_BASE = 1_000_000


def answer_details(items, predictions, rules: str = "official") -> list[dict]:
    read = vlmevalkit.choice_letter if rules == "vlmevalkit" else choice_letter
    unnamed = "" if rules == "vlmevalkit" else "all"  # VLMEvalKit reports no group for a missing column
    details = []
    for item in items:
        prediction = prediction_of(predictions, item)
        letter = read(prediction, item.options)
        details.append({"index": item.index, "prediction": prediction, "extracted": letter,
                        "correct": letter is not None and letter == item.answer.strip().upper(),
                        "category": item.get("category") or unnamed, "l2-category": item.get("l2-category") or unnamed,
                        "split": item.get("split")})
    return details


def choice_counts(details: list[dict]) -> dict[str, int]:
    return {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details),
            "refused": sum(d["extracted"] == REFUSAL for d in details)}


class MMBench(Benchmark):
    name = "mmbench"
    files = ("MMBench",)

    def prompt(self, item) -> str:
        return multiple_choice_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details = answer_details(items, predictions, self.rules)
        groups: dict[int, list[dict]] = defaultdict(list)
        for detail in details:
            groups[int(float(detail["index"])) % ROTATION_BASE].append(detail)
        questions = []
        for group_id, rows in sorted(groups.items()):
            main = min(rows, key=lambda d: int(float(d["index"])))  # the unrotated row names the categories
            questions.append({"index": str(group_id), "correct": all(r["correct"] for r in rows),
                              "category": main["category"], "l2-category": main["l2-category"],
                              "split": main["split"], "rotations": len(rows)})
        if self.as_vlmevalkit:
            metrics = vlmevalkit.report_accuracy(questions)
        else:
            metrics = {"overall": percent(sum(q["correct"] for q in questions), len(questions))}
            metrics.update({f"category/{k}": v for k, v in accuracy_by(questions, "category").items()})
            metrics.update({f"l2-category/{k}": v for k, v in accuracy_by(questions, "l2-category").items()})
        metrics["vanilla"] = percent(sum(d["correct"] for d in details), len(details))  # every row on its own
        counts = choice_counts(details) | {"questions": len(questions)}
        return Score(self.name, "overall", metrics, details, counts)


class SEEDBench(Benchmark):
    name = "seedbench"
    files = ("SEEDBench_IMG", "SEEDBench")

    def prompt(self, item) -> str:
        return multiple_choice_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details = answer_details(items, predictions, self.rules)
        if self.as_vlmevalkit:
            return Score(self.name, "overall", vlmevalkit.report_accuracy(details), details, choice_counts(details))
        metrics = {"overall": percent(sum(d["correct"] for d in details), len(details))}
        metrics.update({f"category/{k}": v for k, v in accuracy_by(details, "category").items()})
        return Score(self.name, "overall", metrics, details, choice_counts(details))
