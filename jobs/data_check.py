"""`vlrlhf data check`: read a data set through the real pipeline and report on it."""

from __future__ import annotations

import collections
import dataclasses
import logging
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


def record_tokens(batch: dict, settings: EncodeSettings, limit: int) -> dict:
    """Ray Data map: records -> tokens after image expansion (the longest row of a pair), image
    tokens among them, and whether `image_overflow: resize` fits a record over `limit`
    (-1 tokens: the record cannot be encoded). The driver receives only numbers."""
    from vlrlhf.data.fit import image_tokens, longest
    from vlrlhf.data.pipeline import cached_adapter, encode_fitted
    from vlrlhf.errors import ReasonError

    adapter = cached_adapter(settings)
    ids = set(adapter.placeholder_token_ids())
    free = dataclasses.replace(settings, max_length=None)
    resize = dataclasses.replace(settings, max_length=limit, image_overflow="resize")
    out = {"tokens": [], "image_tokens": [], "resizable": []}
    for blob in batch["record"]:
        record, partner = pickle.loads(blob)
        tokens, vision, resizable = -1, 0, False
        try:
            example = longest(encode_fitted(adapter, record, free, partner)[0])
            tokens, vision = len(example), image_tokens(example, ids)
            resizable = tokens <= limit or encode_fitted(adapter, record, resize, partner)[1] < 1.0
        except ReasonError:
            pass
        out["tokens"].append(tokens)
        out["image_tokens"].append(vision)
        out["resizable"].append(resizable)
    return {"tokens": np.array(out["tokens"], dtype=np.int64), "image_tokens": np.array(out["image_tokens"],
            dtype=np.int64), "resizable": np.array(out["resizable"], dtype=bool)}


def token_report(rows: list[dict], limit: int) -> dict:
    """The distribution of text and image tokens and what each `data.image_overflow` would do."""
    encoded = [row for row in rows if row["tokens"] >= 0]
    over = [row for row in encoded if row["tokens"] > limit]
    resized = sum(bool(row["resizable"]) for row in over)

    def spread(values: list[int]) -> dict:
        return {"p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)),
                "max": max(values)} if values else {"p50": 0, "p90": 0, "max": 0}

    tokens = [int(row["tokens"]) for row in encoded]
    return {"records": len(rows), "encoded": len(encoded), "failed": len(rows) - len(encoded), "limit": limit,
            "too_long": len(over), "max": max(tokens, default=0), "median": spread(tokens)["p50"],
            "image_tokens": spread([int(row["image_tokens"]) for row in encoded]),
            "text_tokens": spread([int(row["tokens"] - row["image_tokens"]) for row in encoded]),
            "overflow": {"resize": {"resized": resized, "skipped": len(over) - resized},
                         "skip": {"skipped": len(over)}, "raise": {"stops": bool(over)}}}


def quiet_ray_data() -> None:
    """The report is the output: no Ray Data progress bars, plan lines or per-dataset logs."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_data(paths: list[str], data_format: str, *, model_path: str | None, task: str, image_root: str | None,
               max_length: int | None = None, options: dict | None = None, quarantine: str | None = None,
               image_overflow: str = "resize") -> dict:
    """Counts of records, images, kept and skipped rows (by reason) and token lengths after expansion,
    all computed in Ray Data tasks (the records never come to this process)."""
    import ray

    from vlrlhf.data.ledger import start_ledger
    from vlrlhf.data.sources import expand_sources

    if not ray.is_initialized():  # RAY_ADDRESS joins a cluster; otherwise a local one
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, logging_level="ERROR")
    quiet_ray_data()
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
        settings = EncodeSettings(model_path=model_path, task=task, image_root=image_root, max_length=max_length,
                                  image_overflow=image_overflow)
        encoded = encoded_dataset(records, settings, sink=sink).materialize()
        kept = encoded.count()
        if kept:
            lengths = [int(row["length"]) for row in encoded.map_batches(row_lengths, batch_format="numpy")
                       .iter_rows()]
    counts = ray.get(ledger.counts.remote())
    report.update(kept=kept, skipped=counts, dropped_by_rule=ray.get(ledger.dropped_by_rule.remote()),
                  resized=ray.get(ledger.resized.remote()),
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
    if report.get("resized"):
        scales = report["resized"].values()
        print(f"resized          {len(scales)} (images shrunk to fit max_length, sides x{min(scales):.3g} at least)")
    if report.get("tokens"):
        tokens = report["tokens"]
        print(f"tokens (after image expansion)  p50 {tokens['p50']}  p90 {tokens['p90']}  p99 {tokens['p99']}  "
              f"max {tokens['max']}")
    if report.get("quarantine"):
        print(f"quarantine       {report['quarantine']}")
