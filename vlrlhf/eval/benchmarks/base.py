"""What every benchmark provides: its file, its prompt, its scorer.

    bench = get_benchmark("mme")
    items = bench.read("MME.tsv", bad)                 # BenchItems, images resolved
    prompt = bench.prompt(item)                        # the user turn (image placeholders added by the runner)
    result = bench.score(items, predictions, judge)    # Score: metrics, per-item details, counts

`get_benchmark("pope", rules="vlmevalkit")` reads and scores by VLMEvalKit's exact-matching
rules instead of the benchmark's own (docs/evaluation.md has the table of differences).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from vlrlhf.data.reader import BadRecords
from vlrlhf.eval import extract, vlmevalkit
from vlrlhf.eval.tsv import BenchItem, read_tsv

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Please answer yes or no."
RULES = ("official", "vlmevalkit")  # each benchmark's own rules | VLMEvalKit's exact matching


@dataclasses.dataclass
class Score:
    benchmark: str
    headline: str  # the metric a results table shows
    metrics: dict[str, float]
    details: list[dict]  # per item: index, prediction, extracted, correct (or score)
    counts: dict[str, int]  # items, unparsed (scored wrong), unscored (no judge), ...

    def to_json(self) -> dict:
        return {"benchmark": self.benchmark, "headline": self.headline, "metrics": self.metrics,
                "counts": self.counts}


class Benchmark:
    name = ""
    files = ()  # file-name prefixes under --data DIR (case-insensitive), e.g. ("MME",)
    required = ("index", "question", "answer")
    needs_image = True
    needs_judge = False

    def __init__(self, rules: str = "official"):
        if rules not in RULES:
            raise ValueError(f"rules={rules!r} is not one of {', '.join(RULES)}")
        self.rules = rules

    @property
    def as_vlmevalkit(self) -> bool:
        return self.rules == "vlmevalkit"

    def yes_no(self, text: str) -> str | None:
        """'yes', 'no' or None (unparsed) by this benchmark's rules."""
        return vlmevalkit.yes_no(text) if self.as_vlmevalkit else extract.yes_no(text)

    def read(self, path, bad: BadRecords | None = None) -> list[BenchItem]:
        # VLMEvalKit drops rows without an image before anything else (skip_noimg)
        return read_tsv(path, self.required, bad, needs_image=self.needs_image, drop_without_image=self.as_vlmevalkit)

    def prompt(self, item: BenchItem) -> str:
        return item.question

    def score(self, items: list[BenchItem], predictions: dict[str, str], judge=None) -> Score:
        raise NotImplementedError


def yes_no_prompt(item: BenchItem) -> str:
    """The question, with the yes/no instruction unless it already asks for one."""
    return item.question if "yes or no" in item.question.lower() else f"{item.question} {YES_NO_INSTRUCTION}"


def options_block(item: BenchItem) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in item.options.items())


def multiple_choice_prompt(item: BenchItem, instruction: str = MC_INSTRUCTION) -> str:
    hint = item.get("hint")
    parts = ([f"Hint: {hint}"] if hint and hint.lower() != "nan" else []) + [item.question]
    if item.options:
        parts += ["Options:", options_block(item)]
    return "\n".join(parts + [instruction])


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def accuracy_by(details: list[dict], key: str) -> dict[str, float]:
    """Per value of detail[key]: percentage of details with correct == True."""
    hits, totals = defaultdict(int), defaultdict(int)
    for detail in details:
        totals[detail[key]] += 1
        hits[detail[key]] += bool(detail["correct"])
    return {name: percent(hits[name], totals[name]) for name in sorted(totals)}


def prediction_of(predictions: dict[str, str], item: BenchItem) -> str:
    """The model's answer; a question the run lost is an error, never a silent miss."""
    if item.index not in predictions:
        raise KeyError(f"no prediction for index {item.index} (row {item.row})")
    return predictions[item.index] or ""
