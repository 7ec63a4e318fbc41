"""MMMU (Yue+ 2023): multiple-choice and open questions, scored by MMMU's parsing rules.

Multiple choice: strip edge punctuation, pad with spaces; candidates are options
written '(X)', else ' X ' (spaces both sides); else (answers over 5 words) options whose
text appears.
None -> a random option from a generator seeded by `seed` and the index (MMMU's
fallback, made reproducible); several -> the one mentioned last.
Open: the key phrases after 'is', 'so', 'thus', 'therefore', 'final', 'answer',
'result', 'could be' (and '=' in the last sentence) plus every number are the
prediction; it is right when a normalised number equals a gold number or a gold
string occurs in a predicted string.

rules=vlmevalkit: VLMEvalKit scores MMMU as plain multiple choice: an open question becomes
A = its gold answer, B = 'Other Answers' (truth A); the option is read by VLMEvalKit's
exact matching (no random fallback: unparsed is wrong); accuracy overall, per `category`
and `l2-category` (and per `split` when the file has several).
"""

from __future__ import annotations

import ast
import random
import re
import string

from vlrlhf.eval import vlmevalkit
from vlrlhf.eval.benchmarks.base import MC_INSTRUCTION, Benchmark, Score, accuracy_by, multiple_choice_prompt, \
    percent, prediction_of

OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_choice(response: str, options: dict[str, str], rng: random.Random) -> tuple[str, bool]:
    """(letter, parsed): parsed is False when the letter is the random fallback."""
    text = response
    for char in ",.!?;:'":
        text = text.strip(char)
    text = f" {text} "
    candidates = [letter for letter in options if f"({letter})" in text]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [letter for letter in options if f" {letter} " in text]
    by_text = False
    if not candidates and len(text.split()) > 5:
        candidates = [letter for letter, option in options.items() if option and option.lower() in text.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(sorted(options)), False
    if len(candidates) == 1:
        return candidates[0], True

    def position(letter: str) -> int:
        if by_text:
            return text.lower().rfind(options[letter].lower())
        return text.rfind(f"({letter})" if bracketed else f" {letter} ")

    return max(candidates, key=position), True


def to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalise(text: str) -> list:
    """A number (rounded to 2 places) or a lower-cased stripped string, as a list."""
    value = to_number(text.strip().rstrip("."))
    if value is not None:
        return [round(value, 2)]
    text = text.strip().lower()
    return [text] if text else []


def key_responses(response: str) -> list[str]:
    sentences = [s for s in re.split(r"\.\s(?=[A-Z])|\n", response.strip()) if s.strip()]
    keys = []
    for number, sentence in enumerate(sentences):
        indicators = INDICATORS + (("=",) if number == len(sentences) - 1 else ())
        lowered = sentence.lower()
        best = None
        for indicator in indicators:
            at = lowered.rfind(indicator)
            if at >= 0 and (best is None or at + len(indicator) > best):
                best = at + len(indicator)
        if best is not None and sentence[best:].strip():
            keys.append(sentence[best:].strip().strip(".:,;!?"))
    return keys or [response.strip().strip(".")]


def parse_open(response: str) -> list:
    keys = key_responses(response)
    predictions = []
    for key in keys:
        predictions.extend(normalise(key))
        predictions.extend(round(float(n.replace(",", "")), 2) for n in NUMBER.findall(key))
    return list(dict.fromkeys(predictions))


def open_correct(predictions: list, answer: str) -> bool:
    golds = ast.literal_eval(answer) if answer.startswith("[") else [answer]
    normalised = [value for gold in golds for value in normalise(str(gold))]
    for gold in normalised:
        for prediction in predictions:
            if isinstance(gold, float) and isinstance(prediction, float) and gold == prediction:
                return True
            if isinstance(gold, str) and isinstance(prediction, str) and gold in prediction:
                return True
    return False


class MMMU(Benchmark):
    name = "mmmu"
    files = ("MMMU",)
    seed = 42

    def is_open(self, item) -> bool:
        return item.get("question_type").lower() == "open" or not item.options

    def prompt(self, item) -> str:
        if self.is_open(item):
            return f"{item.question}\n{OPEN_INSTRUCTION}"
        return multiple_choice_prompt(item, MC_INSTRUCTION)

    def score(self, items, predictions, judge=None) -> Score:
        if self.as_vlmevalkit:
            return self.score_as_vlmevalkit(items, predictions)
        details = []
        for item in items:
            prediction = prediction_of(predictions, item)
            if self.is_open(item):
                parsed = parse_open(prediction)
                correct, extracted, fallback = open_correct(parsed, item.answer), parsed, False
            else:
                rng = random.Random(f"{self.seed}:{item.index}")
                extracted, parsed_ok = parse_choice(prediction, item.options, rng)
                correct, fallback = extracted == item.answer.strip().upper(), not parsed_ok
            details.append({"index": item.index, "prediction": prediction, "extracted": extracted,
                            "correct": correct, "random_fallback": fallback,
                            "category": item.get("category") or item.get("subject") or "all"})
        metrics = {"overall": percent(sum(d["correct"] for d in details), len(details))}
        metrics.update({f"category/{k}": v for k, v in accuracy_by(details, "category").items()})
        counts = {"items": len(details), "random_fallback": sum(d["random_fallback"] for d in details)}
        return Score(self.name, "overall", metrics, details, counts)

    def score_as_vlmevalkit(self, items, predictions) -> Score:
        details = []
        for item in items:
            prediction = prediction_of(predictions, item)
            options, truth = item.options, item.answer.strip()
            if "A" not in options:  # VLMEvalKit's MMMU_preproc: an open question as a two-way choice
                options = {"A": item.answer, "B": "Other Answers"}
            if not (len(truth) == 1 and truth in string.ascii_uppercase):  # a text answer: its option is A
                truth = "A"
            letter = vlmevalkit.choice_letter(prediction, options)
            details.append({"index": item.index, "prediction": prediction, "extracted": letter,
                            "correct": letter == truth, "category": item.get("category"),
                            "l2-category": item.get("l2-category"), "split": item.get("split")})
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details)}
        return Score(self.name, "overall", vlmevalkit.report_accuracy(details), details, counts)
