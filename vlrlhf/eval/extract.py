"""Answer extraction shared by the rule-based scorers.

    yes_no("Yes, there is a dog.")                 -> "yes"
    choice_letter("The answer is (B).", options)   -> "B"
    choice_letter("I cannot tell.", options)       -> "Z"   (a refusal)
    choice_letter("purple", options)               -> None  (unparseable: scored wrong, counted)
"""

from __future__ import annotations

import re
import string

REFUSALS = ("cannot determine", "can't determine", "cannot be determined", "unable to determine", "not possible to",
            "cannot answer", "can't answer", "i'm sorry", "i am sorry", "none of the options", "cannot tell",
            "can't tell", "not enough information", "no answer")
REFUSAL = "Z"


def words_of(text: str) -> list[str]:
    return re.sub(f"[{re.escape(string.punctuation)}]", " ", text.lower()).split()


def yes_no(text: str) -> str | None:
    """'yes' or 'no' when exactly one of them occurs as a word, else None."""
    words = set(words_of(text))
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes and not has_no:
        return "yes"
    if has_no and not has_yes:
        return "no"
    return None


def is_refusal(text: str) -> bool:
    lowered = text.lower()
    return any(phrase in lowered for phrase in REFUSALS)


def choice_letter(text: str, options: dict[str, str]) -> str | None:
    """The option a free-form answer picks, in this order:
    1. a refusal ('cannot determine', 'sorry', ...) -> 'Z';
    2. 'answer is X' / 'answer: X' with X an option letter;
    3. exactly one option letter standing alone ('B', '(B)', 'B.', 'B) cat'); two or more
       ('It could be A or B') are ambiguous: None, as MMBench's rules treat them;
    4. exactly one option text contained in the answer (case-insensitive);
    else None. Letters not among `options` never count. In answers over three words an unmarked
    lone 'A' or 'I' alone may be an article or a pronoun: it does not count as a letter there."""
    if is_refusal(text):
        return REFUSAL
    letters = set(options)
    stated = re.search(r"answer\s*(?:is|:)\s*\(?([A-I])\)?(?![A-Za-z])", text, flags=re.IGNORECASE)
    if stated and stated.group(1).upper() in letters and (stated.group(1).isupper() or len(text.strip()) < 40):
        return stated.group(1).upper()
    alone = {match for match in re.findall(r"(?<![A-Za-z])([A-I])(?![A-Za-z])", text) if match in letters}
    if len(alone) > 1:  # several letters, even if one of them might be an article: ambiguous
        return None
    # a lone capital "A"/"I" may be an article or a pronoun inside a sentence: count it only in short
    # answers or when marked as an option ("(A)", "A.", "A:", "A)")
    marked = {m for m in re.findall(r"(?:\(([A-I])\)|(?<![A-Za-z])([A-I])[.:)](?!\w))", text) for m in m if m}
    if len(text.split()) > 3:
        alone = {letter for letter in alone if letter not in ("A", "I")} | (marked & letters)
    if len(alone) == 1:
        return alone.pop()
    if not alone:
        lowered = text.lower()
        hits = [letter for letter, option in options.items() if option and option.lower() in lowered]
        if len(hits) == 1:
            return hits[0]
    return None
