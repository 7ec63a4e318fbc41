"""DDPO token weights: character spans of an answer -> weights on its label tokens.

RLHF-V's dense DPO up-weights the tokens of the corrected segments by gamma. The
records carry the segments as [start, end) character spans of the answer text; this
maps them onto the tokens the adapter produced, so any tokenizer and chat template work.
"""

from __future__ import annotations

from vlrlhf.models.batch import IGNORE_INDEX, EncodedExample


def last_answer_positions(labels: list[int]) -> list[int]:
    """Positions of the last contiguous run of label tokens (the final assistant turn)."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(range(start, end))


def token_char_ends(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The decoded text of `ids` and, per token, the length of the text up to and
    including it (prefix decoding: exact for byte-level BPE, where single tokens may
    hold half a character)."""
    ends = [len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]
    return tokenizer.decode(ids, skip_special_tokens=False), ends


def span_weights(tokenizer, example: EncodedExample, answer: str, spans: list[tuple[int, int]],
                 gamma: float) -> list[float]:
    """(T,) weights: gamma on answer tokens overlapping a span, 1 on other tokens."""
    weights = [1.0] * len(example.input_ids)
    positions = last_answer_positions(example.labels)
    if not spans or not positions:
        return weights
    text, ends = token_char_ends(tokenizer, [example.input_ids[p] for p in positions])
    offset = text.find(answer.strip()[:32]) if answer.strip() else 0
    offset = max(offset, 0) - (len(answer) - len(answer.lstrip()))  # spans index the unstripped answer
    start = 0
    for position, end in zip(positions, ends, strict=True):
        lo, hi = start - offset, end - offset
        if hi > lo and any(lo < span_end and span_start < hi for span_start, span_end in spans):
            weights[position] = gamma
        start = end
    return weights
