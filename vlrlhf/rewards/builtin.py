"""Built-in rule rewards. Each: (completions, records, **options) -> list[float].

The reference answer is `record.answer`; multiple-choice options come from
`record.metadata["options"]` ({letter: text}).
"""

from __future__ import annotations

import re

from vlrlhf.eval.extract import choice_letter
from vlrlhf.rewards.maths import math

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _answer(record) -> str:
    if record.answer is None:
        raise ValueError(f"record {record.id} has no answer for a rule reward")
    return record.answer


def exact_match(completions, records) -> list[float]:
    """1 when the completion equals the answer after lower-casing and dropping punctuation."""
    return [float(normalise(c) == normalise(_answer(r))) for c, r in zip(completions, records, strict=True)]


def multiple_choice(completions, records) -> list[float]:
    """1 when the option read from the completion (vlrlhf.eval.extract.choice_letter) is the answer letter."""
    out = []
    for completion, record in zip(completions, records, strict=True):
        options = record.metadata.get("options") or {}
        if not options:
            raise ValueError(f"record {record.id}: multiple_choice needs metadata.options")
        out.append(float(choice_letter(completion, options) == _answer(record).strip().upper()))
    return out


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric(completions, records, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> list[float]:
    """1 when the last number in the completion is within tolerance of the numeric answer."""
    out = []
    for completion, record in zip(completions, records, strict=True):
        target = float(_answer(record).replace(",", ""))
        value = last_number(completion)
        out.append(float(value is not None and abs(value - target) <= max(abs_tol, rel_tol * abs(target))))
    return out


def length_penalty(completions, records, *, max_chars: int = 200, penalty_per_char: float = 0.01) -> list[float]:
    """0 up to `max_chars`, then -penalty_per_char per extra character."""
    return [-penalty_per_char * max(0, len(c) - max_chars) for c in completions]


def format_match(completions, records, *, pattern: str) -> list[float]:
    """1 when the whole completion matches `pattern` (e.g. '<think>.*</think>.*')."""
    compiled = re.compile(pattern, flags=re.DOTALL)
    return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


BUILTINS = {"exact_match": exact_match, "multiple_choice": multiple_choice, "numeric": numeric,
            "length_penalty": length_penalty, "format_match": format_match, "math": math}
