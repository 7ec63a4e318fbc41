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



def convert_rows(rows, path: str, name: str, converter, context: FormatContext):
    """(records with ids 'name:row' (':k' for the k-th of a row), bad rows as (where, reason,
    message)) of one file's (number, row) pairs: what read_records and the pipeline's read
    tasks share."""
    records, bad = [], []
    for number, row in rows:
        try:
            if isinstance(row, RecordError):
                raise row
            if not isinstance(row, dict):
                raise RecordError("wrong_type", f"a row must be an object, got {type(row).__name__}")
            converted = converter(row, context)
        except RecordError as error:
            bad.append((f"{path}:row {number}", error.reason, str(error)))
            continue
        for index, record in enumerate(converted):
            record.id = f"{name}:{number}" + (f":{index}" if len(converted) > 1 else "")
            records.append(record)
    return records, bad


def read_records(paths: list[str] | str, data_format: str, *, options: dict | None = None,
                 bad: BadRecords | None = None) -> list:
    """Every record of `paths` in file order, read in this process (small files: online
    prompts, held-out metrics, tools); training data goes through vlrlhf.data.pipeline."""
    bad = bad or BadRecords()
    converter = get_converter(data_format)
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        context = FormatContext(options=dict(options or {}))
        try:
            records, failed = convert_rows(read_rows(str(path)), path, pathlib.PurePosixPath(str(path)).name,
                                           converter, context)
        except FileNotFoundError:
            raise ValueError(f"data file {path} does not exist") from None
        for where, reason, message in failed:
            bad.handle(where, reason, message, stage="read")
        out += records
        bad.dropped_by_rule.update(context.dropped)
    return out
