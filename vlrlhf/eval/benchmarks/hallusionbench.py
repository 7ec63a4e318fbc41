"""HallusionBench (Guan+ 2024): yes/no questions on original and edited figures.

aAcc: questions answered right. fAcc: figures (category, l2-category, set, figure)
whose every question is right. qAcc: questions (category, l2-category, set, question)
right on every figure variant: HallusionBench's own keys (category, subcategory,
set_id, figure_id | question_id). Answers '1'/'0' or yes/no; an answer without exactly
one of yes/no is wrong (counted). Rows may have no image (a text-only question).

Columns `category` and `l2-category` are required. The set, figure and question ids come
from the columns `set_id`, `figure_id`, `question_id`, else from the index in VLMEvalKit's
layout (`VD_chart_1_<set>_<figure>_<question>`: fields 3, 4, 5 after splitting on '_'); a
row with neither is a bad row.

rules=vlmevalkit (VLMEvalKit's Hallusion_rating): ids from the index first; fAcc groups
(l2-category, set, figure) and qAcc (l2-category, set, question), without `category`;
aAcc/fAcc/qAcc also per category and per l2-category; rows without an image are dropped.
"""

from __future__ import annotations

from collections import defaultdict

from vlrlhf.data.reader import BadRecords
from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of, yes_no_prompt

TRUTH = {"1": "yes", "0": "no", "yes": "yes", "no": "no"}
IDS = ("set_id", "figure_id", "question_id")


def ids_from_columns(item) -> tuple[str, str, str] | None:
    ids = tuple(item.get(name) for name in IDS)
    return ids if all(ids) else None


def ids_from_index(item) -> tuple[str, str, str] | None:
    parts = item.index.split("_")
    return (parts[3], parts[4], parts[5]) if len(parts) >= 6 and all(parts[3:6]) else None


def group_accuracy(details: list[dict], fields: tuple[str, ...]) -> float:
    groups = defaultdict(list)
    for detail in details:
        groups[tuple(detail[f] for f in fields)].append(detail["correct"])
    return percent(sum(all(v) for v in groups.values()), len(groups))


class HallusionBench(Benchmark):
    name = "hallusionbench"
    files = ("HallusionBench",)
    required = ("index", "question", "answer", "category", "l2-category")
    needs_image = False  # some questions come without a figure

    def read(self, path, bad: BadRecords | None = None):
        bad = bad or BadRecords()
        sources = (ids_from_index, ids_from_columns) if self.as_vlmevalkit else (ids_from_columns, ids_from_index)
        items = []
        for item in super().read(path, bad):
            ids = sources[0](item) or sources[1](item)
            if ids is None:
                bad.handle(f"{path}:row {item.row} (index {item.index})", "no_ids",
                           "no_ids: no set_id/figure_id/question_id cells and the index is not in VLMEvalKit's "
                           "layout (<category>_<subcategory>_<n>_<set>_<figure>_<question>)", "benchmark")
                continue
            item.fields.update(zip(IDS, ids, strict=True))
            items.append(item)
        return items

    def prompt(self, item) -> str:
        return yes_no_prompt(item)

    def score(self, items, predictions, judge=None) -> Score:
        details = []
        for item in items:
            prediction = prediction_of(predictions, item)
            extracted = self.yes_no(prediction)
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": extracted is not None and extracted == TRUTH.get(item.answer.lower()),
                            **{f: item.get(f) for f in ("l2-category", "category", *IDS)}})
        keys = ("l2-category",) if self.as_vlmevalkit else ("category", "l2-category")
        metrics = self.accuracies(details, keys)
        if self.as_vlmevalkit:  # Hallusion_rating's rows per category and per l2-category
            for field in ("category", "l2-category"):
                for value in sorted({d[field] for d in details}):
                    subset = [d for d in details if d[field] == value]
                    metrics.update({f"{field}/{value}/{k}": v for k, v in self.accuracies(subset, keys).items()})
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details)}
        return Score(self.name, "aAcc", metrics, details, counts)

    @staticmethod
    def accuracies(details: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
        return {"aAcc": percent(sum(d["correct"] for d in details), len(details)),
                "fAcc": group_accuracy(details, (*keys, "set_id", "figure_id")),
                "qAcc": group_accuracy(details, (*keys, "set_id", "question_id"))}
