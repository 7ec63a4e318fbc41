"""The bad-record ledger of a job: one small Ray actor every pipeline task reports to.

Rows fail inside distributed tasks (reading, converting, encoding). Under
`on_bad_record: raise` the task raises BadRecordError and the job stops with file, row
and reason. Under `skip` the task reports the row here and drops it; the ledger counts
it once per (where, stage), however often Ray re-executes the task or the epochs re-read
the file, and appends it to the quarantine file on the driver's node. Drops a format's
own rules require are set per read unit, so re-reads do not add them up either.
"""

from __future__ import annotations

import collections
import pathlib

from vlrlhf.data.bad import BadRecords


class Ledger:
    """BadRecords behind an actor: `report` from tasks, `summary`/`counts` for the driver."""

    def __init__(self, policy: str, quarantine_path: str | None):
        self.bad = BadRecords(policy, quarantine_path=pathlib.Path(quarantine_path) if quarantine_path else None)
        self.seen: set[tuple[str, str]] = set()
        self.rule_drops: dict[str, collections.Counter] = {}

    def report(self, rows: list[tuple[str, str, str, str]]) -> None:
        """(where, reason, message, stage) of rows a task skipped."""
        for where, reason, message, stage in rows:
            if (where, stage) not in self.seen:
                self.seen.add((where, stage))
                self.bad.handle(where, reason, message, stage=stage)

    def report_resized(self, rows: list[tuple[str, float]]) -> None:
        """(where, scale) of records whose images were shrunk to fit max_length."""
        self.bad.resized.update(rows)

    def resized(self) -> dict[str, float]:
        return dict(self.bad.resized)

    def set_rule_drops(self, unit: str, dropped: dict[str, int]) -> None:
        self.rule_drops[unit] = collections.Counter(dropped)
        self.bad.dropped_by_rule = sum(self.rule_drops.values(), collections.Counter())

    def counts(self) -> dict[str, int]:
        return dict(self.bad.counts)

    def dropped_by_rule(self) -> dict[str, int]:
        return dict(self.bad.dropped_by_rule)

    def summary(self) -> str:
        return self.bad.summary()


def start_ledger(policy: str, quarantine_path: pathlib.Path | str | None):
    """The job's ledger actor, on the driver's node (the quarantine file lands next to the run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(Ledger).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
                                      ).remote(policy, str(quarantine_path) if quarantine_path else None)
