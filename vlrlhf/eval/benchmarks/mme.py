"""MME (Fu+ 2023): yes/no questions, two per image.

Per subtask: acc = share of questions right, acc+ = share of images with both
questions right; the subtask score is acc + acc+ (in percent, max 200). Perception
sums 10 subtasks (max 2000), cognition 4 (max 800). An answer with neither or both
of yes/no is wrong (counted as unparsed). rules=vlmevalkit reads yes/no by VLMEvalKit's
rule (`vlrlhf.eval.vlmevalkit.yes_no`); the aggregation is the same.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "ocr")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


class MME(Benchmark):
    name = "mme"
    files = ("MME",)
    required = ("index", "question", "answer", "category")

    def score(self, items, predictions, judge=None) -> Score:
        details = []
        for item in items:
            prediction = prediction_of(predictions, item)
            extracted = self.yes_no(prediction)
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": extracted is not None and extracted == item.answer.strip().lower(),
                            "category": item.get("category").lower(),
                            "image": item.get("image_path") or item.image_key})
        metrics: dict[str, float] = {}
        by_task = defaultdict(list)
        for detail in details:
            by_task[detail["category"]].append(detail)
        for task, rows in sorted(by_task.items()):
            images = defaultdict(list)
            for row in rows:
                images[row["image"]].append(row["correct"])
            acc = percent(sum(r["correct"] for r in rows), len(rows))
            acc_plus = percent(sum(all(v) for v in images.values()), len(images))
            metrics[f"{task}/acc"], metrics[f"{task}/acc+"] = acc, acc_plus
            metrics[task] = acc + acc_plus
        metrics["perception"] = sum(metrics.get(task, 0.0) for task in PERCEPTION)
        metrics["cognition"] = sum(metrics.get(task, 0.0) for task in COGNITION)
        metrics["total"] = metrics["perception"] + metrics["cognition"]
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details)}
        return Score(self.name, "perception", metrics, details, counts)
