"""reference.mode: precomputed. One pass of the reference over every train and held-out
pair, written once as Parquet (id, reference) under checkpoint.dir/reference_logps/, then
reused by every epoch, every resume and every later run of the same data and models
(its _manifest.json must match). The reference stage's actors are released after it.
"""

from __future__ import annotations

import json
import time

from vlrlhf.config import JobSpec
from vlrlhf.data.pipeline import encoded_dataset

MANIFEST, MARKER = "_manifest.json", "_COMPLETE"


def fingerprint(spec: JobSpec) -> dict:
    """What the table depends on: a change to any of these makes it stale."""
    data, algorithm = spec.data, spec.algorithm
    return {"model": spec.reference.path or spec.model.path, "train": data.train, "eval": data.eval,
            "eval_fraction": data.eval_fraction, "seed": spec.trainer.seed, "format": data.format,
            "format_options": data.format_options, "max_length": data.max_length,
            "image_overflow": data.image_overflow, "image_root": data.image_root,
            "ddpo_gamma": algorithm.ddpo_gamma, "mdpo_keep": list(algorithm.mdpo.keep) if algorithm.mdpo else None}


def _filesystem(folder: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(folder) if "://" in folder else (fs.LocalFileSystem(), folder)


def _read_text(folder: str, name: str) -> str | None:
    filesystem, inner = _filesystem(folder)
    try:
        with filesystem.open_input_stream(f"{inner}/{name}") as stream:
            return stream.read().decode()
    except (FileNotFoundError, OSError):
        return None


def _write_text(folder: str, name: str, text: str) -> None:
    filesystem, inner = _filesystem(folder)
    filesystem.create_dir(inner, recursive=True)
    with filesystem.open_output_stream(f"{inner}/{name}") as stream:
        stream.write(text.encode())


def precompute_reference(spec: JobSpec, data, stage) -> str:
    """The table's folder (local or URI), written now unless a matching one is there."""
    folder = spec.checkpoint.dir.rstrip("/") + "/reference_logps"
    manifest = json.dumps(fingerprint(spec), sort_keys=True)
    if _read_text(folder, MARKER) is not None and _read_text(folder, MANIFEST) == manifest:
        print(f"reference log-probs: reusing {folder}")
        return folder
    started = time.perf_counter()
    filesystem, inner = _filesystem(folder)
    filesystem.delete_dir_contents(inner, missing_dir_ok=True)
    from jobs.common import raising_bad_records

    from vlrlhf.data.order import Window
    from vlrlhf.data.pipeline import record_dataset

    # one execution (one start of the readers, encoders and reference actors): the held-out
    # records, then every train unit in file order
    windows = data.held_out_windows() + [Window(0, index, (index,), count)
                                         for index, count in enumerate(data.train_counts) if count]
    records = record_dataset((data.train, data.held_out_source or data.train), windows, data.resources)
    encoded = encoded_dataset(records, data.settings, sink=data.sink, resources=data.resources)
    raising_bad_records(stage(encoded).select_columns(["id", "reference"]).write_parquet, f"{folder}/pairs")
    _write_text(folder, MANIFEST, manifest)
    _write_text(folder, MARKER, "")
    print(f"reference log-probs precomputed in {time.perf_counter() - started:.1f}s: {folder}")
    return folder
