"""POPE (Li+ 2023): object-existence yes/no questions in three splits.

Extraction follows POPE's rule: the first sentence, commas dropped, is 'no' when it
holds the word 'no', 'No' or 'not', else 'yes'. Per split (random, popular,
adversarial; column `category` or `split`) and overall: accuracy, precision, recall
and F1 with 'yes' as the positive class, and the yes-ratio of the PREDICTIONS.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of, yes_no_prompt


def pope_answer(text: str) -> str:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split()
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def binary_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """(predicted, truth) in yes/no -> accuracy, precision, recall, f1, yes_ratio (percent)."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    correct = sum(p == t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(correct, len(pairs)), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": percent(sum(p == "yes" for p, _ in pairs), len(pairs))}


class POPE(Benchmark):
    name = "pope"
    files = ("POPE",)

    def prompt(self, item) -> str:
        return yes_no_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details, splits = [], defaultdict(list)
        for item in items:
            prediction = prediction_of(predictions, item)
            extracted, truth = pope_answer(prediction), item.answer.strip().lower()
            split = item.get("category") or item.get("split") or "all"
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": extracted == truth, "split": split})
            splits[split].append((extracted, truth))
        metrics = {f"{split}/{name}": value for split, pairs in sorted(splits.items())
                   for name, value in binary_metrics(pairs).items()}
        metrics.update(binary_metrics([pair for pairs in splits.values() for pair in pairs]))
        return Score(self.name, "f1", metrics, details, {"items": len(details)})
