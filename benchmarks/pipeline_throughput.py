"""Encoding throughput: the Ray Data pipeline vs a single-process loop over the same data.

    .venv/bin/python benchmarks/pipeline_throughput.py [--family qwen2_vl] [--records 400] [--workers 2]

Both sides load every image and run the model's adapter (processor, chat template,
label mask) on the bundled shapes preference data; the pipeline's start-up (worker
processes importing transformers) is timed apart from its steady state. Prints
examples/s for each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from vlrlhf.data.pipeline import EncodeSettings, encode_record, encoded_dataset, iter_encoded
    from vlrlhf.data.reader import BadRecords, read_records
    from vlrlhf.models.registry import load_adapter
    from vlrlhf.models.tiny import build_tiny_model

    model = build_tiny_model(args.family, tempfile.mkdtemp() + "/model")
    data = ROOT / "data" / "shapes"
    records = read_records(str(data / "preference.json"), "plain_dpo")[: args.records]
    settings = EncodeSettings(model_path=str(model), task="preference", image_root=str(data))

    adapter = load_adapter(model)
    started = time.perf_counter()
    for record in records:
        encode_record(adapter, record, settings)
    single = len(records) / (time.perf_counter() - started)

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    warm = encoded_dataset(records[: 4 * args.workers], settings, batch_size=4)
    list(iter_encoded(warm, BadRecords()))  # start and warm the workers
    started = time.perf_counter()
    count = sum(1 for _ in iter_encoded(encoded_dataset(records, settings, batch_size=16), BadRecords()))
    pipeline = count / (time.perf_counter() - started)
    ray.shutdown()

    print(f"{args.family}, {len(records)} preference pairs (2 encodes each), {args.workers} CPUs")
    print(f"single-process loop   {single:8.1f} examples/s")
    print(f"ray data pipeline     {pipeline:8.1f} examples/s")
    print(f"ratio pipeline/single {pipeline / single:8.2f}x")


if __name__ == "__main__":
    main()
