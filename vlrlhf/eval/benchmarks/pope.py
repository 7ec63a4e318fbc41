"""POPE (Li+ 2023): object-existence yes/no questions in three splits.

Extraction follows POPE's rule: the first sentence, commas dropped, is 'no' when it
holds the word 'no', 'No' or 'not', else 'yes'. A row's splits (random, popular,
adversarial) are its `category` (or `split`) cell split on commas: a row of
"adversarial,popular" counts in both. Per split and overall: accuracy, precision,
recall and F1 with 'yes' as the positive class, and the yes-ratio of the PREDICTIONS.
Overall pools the splits' rows, as if the split files were concatenated: a row in two
splits counts twice there too (as in VLMEvalKit).

rules=vlmevalkit: yes/no read by VLMEvalKit's rule; an answer with neither (or both) is
wrong and counts as a 'no' prediction in precision and recall, as VLMEvalKit counts it.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of, yes_no_prompt


def pope_answer(text: str) -> str:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split()
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def binary_metrics(pairs: list[tuple[str | None, str]]) -> dict[str, float]:
    """(predicted, truth) -> accuracy, precision, recall, f1, yes_ratio (percent). A prediction
    of None (unparsed) is wrong and not a 'yes'."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p != "yes" and t == "yes" for p, t in pairs)
    correct = sum(p == t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(correct, len(pairs)), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": percent(sum(p == "yes" for p, _ in pairs), len(pairs))}


def splits_of(item) -> list[str]:
    cell = item.get("category") or item.get("split")
    return [part.strip() for part in cell.split(",") if part.strip()] or ["all"]


class POPE(Benchmark):
    name = "pope"
    files = ("POPE",)

    def prompt(self, item) -> str:
        return yes_no_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details, splits = [], defaultdict(list)
        for item in items:
            prediction = prediction_of(predictions, item)
            extracted = self.yes_no(prediction) if self.as_vlmevalkit else pope_answer(prediction)
            truth = item.answer.strip().lower()
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": extracted == truth, "split": ",".join(splits_of(item))})
            for split in splits_of(item):
                splits[split].append((extracted, truth))
        metrics = {f"{split}/{name}": value for split, pairs in sorted(splits.items())
                   for name, value in binary_metrics(pairs).items()}
        metrics.update(binary_metrics([pair for pairs in splits.values() for pair in pairs]))
        counts = {"items": len(details)}
        if self.as_vlmevalkit:
            counts["unparsed"] = sum(d["extracted"] is None for d in details)
        return Score(self.name, "f1", metrics, details, counts)
