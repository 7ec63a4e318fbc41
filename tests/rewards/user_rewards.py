"""Reward functions a user would write, for the tests (imported by path)."""

import math


def shaky(completions, records, **options):
    """Fails on completions that contain 'boom'; NaN for 'nan'."""
    out = []
    for completion in completions:
        if "boom" in completion:
            raise RuntimeError("parser crashed")
        out.append(math.nan if completion == "nan" else 0.5)
    return out


def too_few(completions, records, **options):
    return [1.0]


def stalls(completions, records, **options):
    """Hangs (for `seconds`) on a completion that says 'stall': a remote verifier that never answers."""
    import time

    if any(completion == "stall" for completion in completions):
        time.sleep(options.get("seconds", 3.0))
    return [1.0] * len(completions)
