"""Reading data files into records, under the bad-record policy.

`on_bad_record: raise` (default): the first bad row stops the job with an error naming
file, row and reason. `skip`: bad rows are counted per reason and written to a
quarantine JSONL (one line per row: where, stage, reason, message); the counts are
printed and logged. Drops required by a format's own rules (VLFeedback ties) are
counted apart, in both modes. Nothing is dropped silently.
"""

from __future__ import annotations

import pathlib

from vlrlhf.data.bad import POLICIES, BadRecordError, BadRecords  # noqa: F401 - re-exported
from vlrlhf.data.formats import FormatContext, RecordError, get_converter, read_rows



def read_records(paths: list[str] | str, data_format: str, *, options: dict | None = None,
                 bad: BadRecords | None = None) -> list:
    """Every record of `paths` in file order; ids are 'file:row' (':k' for the k-th record of a row)."""
    bad = bad or BadRecords()
    converter = get_converter(data_format)
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        name = pathlib.PurePosixPath(str(path)).name
        context = FormatContext(options=dict(options or {}))
        try:
            rows = read_rows(str(path))
            for number, row in rows:
                where = f"{path}:row {number}"
                try:
                    if isinstance(row, RecordError):
                        raise row
                    if not isinstance(row, dict):
                        raise RecordError("wrong_type", f"a row must be an object, got {type(row).__name__}")
                    converted = converter(row, context)
                except RecordError as error:
                    bad.handle(where, error.reason, str(error), stage="read")
                    continue
                for index, record in enumerate(converted):
                    record.id = f"{name}:{number}" + (f":{index}" if len(converted) > 1 else "")
                    out.append(record)
        except FileNotFoundError:
            raise ValueError(f"data file {path} does not exist") from None
        bad.dropped_by_rule.update(context.dropped)
    return out
