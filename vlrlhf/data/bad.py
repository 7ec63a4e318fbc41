"""The bad-record policy and its ledger, with no heavy imports (the ledger actor loads only this).

`on_bad_record: raise` (default): the first bad row stops the job with an error naming
file, row and reason. `skip`: bad rows are counted per reason and written to a
quarantine JSONL (one line per row: where, stage, reason, message).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import threading

POLICIES = ("raise", "skip")


class BadRecordError(ValueError):
    """A bad record under `on_bad_record: raise`; the message names file, row and reason."""

    def __init__(self, where: str, reason: str, message: str):
        super().__init__(f"{where}: {message}" if message.startswith(reason) else f"{where}: {reason}: {message}")
        self.where, self.reason, self.message = where, reason, message

    def __reduce__(self):  # raised in Ray tasks: it must survive pickling with its fields
        return type(self), (self.where, self.reason, self.message)


@dataclasses.dataclass
class BadRecords:
    """The bad-record policy and its ledger (counts per reason, quarantine file)."""

    policy: str = "raise"
    quarantine_path: pathlib.Path | None = None
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_by_rule: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    resized: dict = dataclasses.field(default_factory=dict)  # where -> image scale (data.image_overflow)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"on_bad_record={self.policy!r} is not one of {', '.join(POLICIES)}")
        self._lock = threading.Lock()

    def handle(self, where: str, reason: str, message: str, stage: str) -> None:
        """Raise (policy raise) or count and quarantine (policy skip)."""
        if self.policy == "raise":
            raise BadRecordError(where, reason, message)
        with self._lock:
            self.counts[reason] += 1
            if self.quarantine_path is not None:
                self.quarantine_path.parent.mkdir(parents=True, exist_ok=True)
                with self.quarantine_path.open("a") as handle:
                    handle.write(json.dumps({"where": where, "stage": stage, "reason": reason,
                                             "message": message}) + "\n")

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = [f"skipped {self.skipped} bad record(s)" + (f" {dict(self.counts)}" if self.counts else "")]
        if self.dropped_by_rule:
            parts.append(f"dropped by the format's rules {dict(self.dropped_by_rule)}")
        if self.resized:
            parts.append(f"resized the images of {len(self.resized)} record(s) to fit max_length (sides x"
                         f"{min(self.resized.values()):.3g} at least)")
        if self.counts and self.quarantine_path is not None:
            parts.append(f"quarantine: {self.quarantine_path}")
        return "; ".join(parts)
