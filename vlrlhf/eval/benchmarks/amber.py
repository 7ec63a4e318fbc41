"""AMBER (Wang+ 2023), discriminative part: yes/no questions on existence, attributes
(state, number, action) and relations.

AMBER's metrics take 'no' as the positive class (a hallucinated object, attribute or
relation is what the question probes): precision = right 'no' answers / 'no'
answers, recall = right 'no' answers / questions whose truth is 'no', F1 from those;
accuracy over all. Overall and per dimension: existence (type
discriminative-hallucination), attribute (-attribute-state/-number/-action, also
reported apart) and relation. An answer without exactly one of yes/no is wrong.

rules=vlmevalkit (VLMEvalKit's AMBER_rating): yes/no read by VLMEvalKit's rule; a type
outside the five above is a dimension of its own; the headline `avg_accuracy` is the mean
of the dimensions' accuracies (existence, attribute, relation), not the accuracy over all
questions.

Files: a TSV in the VLMEvalKit layout with the AMBER type in `category`, or AMBER's
own folder (data/query/query_discriminative.json, data/annotations.json and the
images under image/), found by `read`.
"""

from __future__ import annotations

import json
import pathlib
from collections import defaultdict

from vlrlhf.data.reader import BadRecords
from vlrlhf.eval.benchmarks.base import Benchmark, Score, percent, prediction_of, yes_no_prompt
from vlrlhf.eval.tsv import BenchItem, TSVError

DIMENSIONS = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "attribute",
              "discriminative-attribute-number": "attribute", "discriminative-attribute-action": "attribute",
              "discriminative-relation": "relation"}


def no_positive_metrics(pairs: list[tuple[str | None, str]]) -> dict[str, float]:
    """(answer, truth) -> accuracy, precision, recall, f1 with 'no' positive (percent)."""
    answered_no = sum(a == "no" for a, _ in pairs)
    truth_no = sum(t == "no" for _, t in pairs)
    hits = sum(a == "no" and t == "no" for a, t in pairs)
    precision = hits / answered_no if answered_no else 0.0
    recall = hits / truth_no if truth_no else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(sum(a == t for a, t in pairs), len(pairs)), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1}


class AMBER(Benchmark):
    name = "amber"
    files = ("AMBER",)
    required = ("index", "question", "answer", "category")

    def read(self, path, bad: BadRecords | None = None) -> list[BenchItem]:
        path = pathlib.Path(path)
        if path.is_dir():
            return read_official(path, bad or BadRecords())
        return super().read(path, bad)

    def prompt(self, item) -> str:
        return yes_no_prompt(item)

    def dimension(self, kind: str) -> str:
        if kind in DIMENSIONS:
            return DIMENSIONS[kind]
        return kind if self.as_vlmevalkit and kind != "relation" else "relation"

    def score(self, items, predictions, judge=None) -> Score:
        details, groups, dimensions = [], defaultdict(list), set()
        for item in items:
            prediction = prediction_of(predictions, item)
            answer, truth, kind = self.yes_no(prediction), item.answer.strip().lower(), item.get("category")
            details.append({"index": item.index, "prediction": prediction, "extracted": answer,
                            "correct": answer == truth, "type": kind})
            dimensions.add(self.dimension(kind))
            # a set: 'discriminative-relation' is both a dimension and a type, counted once
            for group in {"all", self.dimension(kind), kind.removeprefix("discriminative-")}:
                groups[group].append((answer, truth))
        metrics = no_positive_metrics(groups.pop("all", []))
        for group, pairs in sorted(groups.items()):
            metrics.update({f"{group}/{name}": value for name, value in no_positive_metrics(pairs).items()})
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details)}
        if self.as_vlmevalkit:
            metrics["avg_accuracy"] = sum(metrics[f"{d}/accuracy"] for d in dimensions) / max(len(dimensions), 1)
            return Score(self.name, "avg_accuracy", metrics, details, counts)
        return Score(self.name, "f1", metrics, details, counts)


def read_official(folder: pathlib.Path, bad: BadRecords) -> list[BenchItem]:
    """AMBER's release: query and annotation JSON (ids from 1) and an image folder."""
    root = folder / "data" if (folder / "data").is_dir() else folder
    query_path = next((p for p in (root / "query" / "query_discriminative.json", root / "query_discriminative.json")
                       if p.is_file()), None)
    if query_path is None or not (root / "annotations.json").is_file():
        raise TSVError(f"{folder}: no AMBER query_discriminative.json and annotations.json")
    truth = {entry["id"]: entry for entry in json.loads((root / "annotations.json").read_text())}
    images = folder / "image" if (folder / "image").is_dir() else folder / "images"
    items = []
    for number, query in enumerate(json.loads(query_path.read_text()), start=1):
        where = f"{query_path}:row {number} (id {query.get('id')})"
        annotation = truth.get(query.get("id"))
        if annotation is None or not str(annotation.get("type", "")).startswith("discriminative"):
            bad.handle(where, "no_annotation", "no_annotation: no discriminative annotation for this id", "benchmark")
            continue
        image = images / query["image"]
        if not image.is_file():
            bad.handle(where, "missing", f"missing: image {image} does not exist", "benchmark")
            continue
        items.append(BenchItem(str(query["id"]), number, query["query"], [image.read_bytes()],
                               str(annotation["truth"]), {}, {"category": annotation["type"]}, str(query["id"])))
    return items
