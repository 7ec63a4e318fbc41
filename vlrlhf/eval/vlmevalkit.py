"""VLMEvalKit's exact-matching rules (`rules: vlmevalkit`), written from its documented behaviour.

With no judge (`exact_matching`), VLMEvalKit reads answers this way:

    yes_no("**Yes**")                                  -> None   ('*' is kept, so no word is 'yes')
    yes_no("Yes, there is.")                           -> "yes"
    choice_letter("I think it is B", options)          -> "B"    (the letter is among the last 4 tokens)
    choice_letter("B is right, I think so", options)   -> None   (too far from the end)
    choice_letter("It could be A or B", options)       -> None   (two letters: ambiguous)
    choice_letter("a small dog", {"A": "cat", "B": "dog"}) -> "B" (a unique option text, short answer)

VLMEvalKit then scores an unparsed answer as wrong ('Unknown' for yes/no, 'Z' for options).
"""

from __future__ import annotations

import re
from collections import defaultdict

# process_punctuation: these become '' when spaced or when the text has a digit,digit; else ' '
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
PERIOD_LIMIT = 32  # VLMEvalKit passes re.UNICODE (32) as sub's count: at most 32 periods go
REJECTIONS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
              "I'm sorry, but without the image provided", "Cannot determine the answer")
OPTION_SEPARATORS = ".()[],:;!*#{}"
STATED = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
REFUSAL = "Z"


def strip_punctuation(text: str) -> str:
    """VLMEvalKit's process_punctuation (VQA-style): note '*', "'", ':' are kept."""
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=PERIOD_LIMIT)


def yes_no(text: str) -> str | None:
    """'yes' / 'no' when exactly one is a word after lower-casing and strip_punctuation; else None."""
    words = strip_punctuation(text.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return None


def option_from_letters(answer: str, options: dict[str, str]) -> str | None:
    """can_infer_option: a rejection phrase -> 'Z'; exactly one option letter as a token, among the
    last four tokens; no option letter but a 'Z' token -> 'Z'; else 'answer is X' (X in A-D)."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(phrase in answer for phrase in REJECTIONS):
        return REFUSAL
    cleaned = answer
    for mark in OPTION_SEPARATORS:
        cleaned = cleaned.replace(mark, " ")
    tokens = cleaned.split()
    named = [letter for letter in options if letter in tokens]
    if len(named) == 1:
        if tokens.index(named[0]) > len(tokens) - 5:
            return named[0]
    elif not named and "Z" in tokens:
        return REFUSAL
    stated = STATED.search(answer)
    if stated and stated.group(1).upper() in options:
        return stated.group(1).upper()
    return None


def option_from_text(answer: str, options: dict[str, str]) -> str | None:
    """can_infer_text: at most twice as long as all option texts together, and exactly one option
    text inside it (case-insensitive)."""
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in options.values()):
        return None
    hits = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def choice_letter(answer: str, options: dict[str, str]) -> str | None:
    """can_infer: the option letter, 'Z' (a refusal) or None (unparsed)."""
    return option_from_letters(answer, options) or option_from_text(answer, options)


def report_accuracy(details: list[dict], key: str = "correct") -> dict[str, float]:
    """report_acc: `overall`, `category/X`, `l2-category/X` over `details` (each has those fields);
    with two or more values of `split`, the same again under `split/S/` for each split."""
    def percent(hits: list[bool]) -> float:
        return 100.0 * sum(hits) / len(hits) if hits else 0.0

    def accuracies(rows: list[dict], prefix: str) -> dict[str, float]:
        out = {f"{prefix}overall": percent([bool(r[key]) for r in rows])}
        for field in ("category", "l2-category"):
            groups = defaultdict(list)
            for row in rows:
                if row.get(field):
                    groups[row[field]].append(bool(row[key]))
            out.update({f"{prefix}{field}/{name}": percent(hits)
                        for name, hits in sorted(groups.items())})
        return out

    metrics = accuracies(details, "")
    splits = sorted({row.get("split") for row in details if row.get("split")})
    if len(splits) > 1:
        for split in splits:
            metrics.update(accuracies([r for r in details if r.get("split") == split], f"split/{split}/"))
    return metrics
