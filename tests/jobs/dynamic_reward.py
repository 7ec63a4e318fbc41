"""A reward for tests/jobs/test_dynamic_sampling.py, named by import path in the spec."""

from __future__ import annotations

import re
import zlib


def odd_rows_differ(completions, records) -> list[float]:
    """0 for the prompts of even rows (every sample equal: a group with no signal); for odd
    rows a value read from the completion's text, so a group's samples differ."""
    out = []
    for completion, record in zip(completions, records, strict=True):
        row = int(re.search(r":(\d+)(?::\d+)?$", record.id).group(1))
        out.append(0.0 if row % 2 == 0 else zlib.crc32(completion.encode()) % 97 / 97)
    return out
