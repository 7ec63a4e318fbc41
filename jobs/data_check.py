"""`vlrlhf data check`: read a data set through the real pipeline and report on it."""

from __future__ import annotations

import collections
import os
import pathlib
import tempfile

import numpy as np

from vlrlhf.data.pipeline import EncodedPair, EncodeSettings, encoded_dataset, iter_encoded
from vlrlhf.data.reader import BadRecords, read_records


def lengths_of(item) -> list[int]:
    encoded = item.encoded
    if isinstance(encoded, EncodedPair):
        return [len(encoded.chosen), len(encoded.rejected)]
    return [len(encoded)]


def check_data(paths: list[str], data_format: str, *, model_path: str | None, task: str, image_root: str | None,
               max_length: int | None = None, options: dict | None = None, quarantine: str | None = None) -> dict:
    """Counts of records, images, kept and skipped rows (by reason) and token lengths after expansion."""
    quarantine_path = pathlib.Path(quarantine) if quarantine else pathlib.Path(tempfile.mkdtemp()) / "bad.jsonl"
    bad = BadRecords(policy="skip", quarantine_path=quarantine_path)
    records = read_records(paths, data_format, options=options, bad=bad)
    report = {"records": len(records), "images": sum(len(r.images) for r in records)}
    lengths: list[int] = []
    kept = len(records)
    if model_path is not None:
        import ray

        if not ray.is_initialized():  # RAY_ADDRESS joins a cluster; otherwise a local one
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     logging_level="ERROR")
        settings = EncodeSettings(model_path=model_path, task=task, image_root=image_root, max_length=max_length)
        kept = 0
        for item in iter_encoded(encoded_dataset(records, settings), bad):
            kept += 1
            lengths.extend(lengths_of(item))
    report.update(kept=kept, skipped=dict(bad.counts), dropped_by_rule=dict(bad.dropped_by_rule),
                  quarantine=str(quarantine_path) if bad.counts else None)
    if lengths:
        report["tokens"] = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": max(lengths)}
    return report


def print_report(report: dict) -> None:
    print(f"records          {report['records']}")
    print(f"images           {report['images']}")
    print(f"kept             {report['kept']}")
    skipped = collections.Counter(report["skipped"])
    print(f"skipped          {sum(skipped.values())}" + "".join(f"\n  {k:<15}{v}" for k, v in sorted(skipped.items())))
    for reason, count in sorted(report["dropped_by_rule"].items()):
        print(f"dropped by rule  {reason}: {count}")
    if report.get("tokens"):
        tokens = report["tokens"]
        print(f"tokens (after image expansion)  p50 {tokens['p50']}  p90 {tokens['p90']}  p99 {tokens['p99']}  "
              f"max {tokens['max']}")
    if report.get("quarantine"):
        print(f"quarantine       {report['quarantine']}")
