"""`vlrlhf data check`: read a data set through the real pipeline and report on it."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import tempfile

import numpy as np

from vlrlhf.data.pipeline import BadRows, EncodedPair, EncodeSettings, RecordSource, encoded_dataset, record_dataset


def lengths_of(item) -> list[int]:
    encoded = item.encoded
    if isinstance(encoded, EncodedPair):
        return [len(encoded.chosen), len(encoded.rejected)]
    return [len(encoded)]


def row_lengths(batch: dict) -> dict:
    """Ray Data map: encoded rows -> their token lengths (the driver receives only numbers)."""
    lengths = [n for payload in batch["payload"] for n in lengths_of(pickle.loads(payload))]
    return {"length": np.array(lengths, dtype=np.int64)}


def count_images(batch: dict) -> dict:
    return {"images": np.array([len(pickle.loads(blob)[0].images) for blob in batch["record"]], dtype=np.int64)}


def check_data(paths: list[str], data_format: str, *, model_path: str | None, task: str, image_root: str | None,
               max_length: int | None = None, options: dict | None = None, quarantine: str | None = None) -> dict:
    """Counts of records, images, kept and skipped rows (by reason) and token lengths after expansion,
    all computed in Ray Data tasks (the records never come to this process)."""
    import ray

    from vlrlhf.data.ledger import start_ledger
    from vlrlhf.data.sources import expand_sources

    if not ray.is_initialized():  # RAY_ADDRESS joins a cluster; otherwise a local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="ERROR")
    quarantine_path = pathlib.Path(quarantine) if quarantine else pathlib.Path(tempfile.mkdtemp()) / "bad.jsonl"
    ledger = start_ledger("skip", quarantine_path)
    sink = BadRows("skip", ledger)
    records = record_dataset(RecordSource(tuple(expand_sources(paths)), data_format, dict(options or {}), sink=sink))
    total = records.count()
    images = records.map_batches(count_images, batch_format="numpy").sum("images") if total else 0
    report = {"records": total, "images": int(images or 0)}
    lengths: list[int] = []
    kept = report["records"]
    if model_path is not None:
        settings = EncodeSettings(model_path=model_path, task=task, image_root=image_root, max_length=max_length)
        encoded = encoded_dataset(records, settings, sink=sink).materialize()
        kept = encoded.count()
        if kept:
            lengths = [int(row["length"]) for row in encoded.map_batches(row_lengths, batch_format="numpy")
                       .iter_rows()]
    counts = ray.get(ledger.counts.remote())
    report.update(kept=kept, skipped=counts, dropped_by_rule=ray.get(ledger.dropped_by_rule.remote()),
                  quarantine=str(quarantine_path) if counts else None)
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
