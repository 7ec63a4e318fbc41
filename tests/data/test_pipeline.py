"""The Ray Data pipeline on a local Ray: same examples as the single-process encoder,
a seeded windowed order independent of encoders and blocks, exact resume by key,
shards and folders and save_to_disk datasets as sources, no eval leakage, held-out
windows with one row per record, and the bad-record policy in the actors."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from vlrlhf.data.ledger import start_ledger
from vlrlhf.data.order import Window, make_key, plan_windows, record_hash
from vlrlhf.data.pipeline import (BadRows, EncodedPair, EncodeSettings, PipelineResources, RecordSource,
                                  count_records, encode_record, encoded_dataset, in_eval_split, iter_items,
                                  record_dataset)
from vlrlhf.data.reader import BadRecordError, read_records
from vlrlhf.data.sources import expand_sources
from vlrlhf.data.synthetic import synthesize
from vlrlhf.models.registry import load_adapter
from jobs.common import raising_bad_records


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(root, num_train=24, num_test=4, seed=1)
    return root


def same(a, b) -> bool:
    if isinstance(a, EncodedPair):
        return same(a.chosen, b.chosen) and same(a.rejected, b.rejected)
    return (a.input_ids == b.input_ids and a.labels == b.labels and a.token_arrays == b.token_arrays
            and a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))


def source_of(paths, data_format: str, **kwargs) -> RecordSource:
    return RecordSource(tuple(expand_sources(paths)), data_format, **kwargs)


def records_of(paths, data_format: str, **kwargs):
    return record_dataset(source_of(paths, data_format, **kwargs))


def ordered(source: RecordSource, seed: int, epochs: range, window_rows: int = 1024, after_key=None, **kwargs):
    windows = plan_windows(count_records(source), seed, epochs, window_rows, after_key)
    return record_dataset(source, windows, **kwargs)


def test_pipeline_equals_single_process_encoder_in_seeded_order(ray_cluster, shapes, tiny_path):
    records = read_records(str(shapes / "preference.json"), "plain_dpo")  # the single-process oracle
    settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference", image_root=str(shapes))
    source = source_of(str(shapes / "preference.json"), "plain_dpo")
    both = list(iter_items(encoded_dataset(ordered(source, 3, range(0, 2)), settings, batch_size=4)))
    items = both[:24]  # one execution streams both epochs, in order
    expected = sorted(records, key=lambda r: record_hash(r.id, 3, 0))  # one file, one window: a hash order
    assert [i.id for i in items] == [r.id for r in expected] and len(both) == 48
    assert [i.key for i in both] == [make_key(epoch, 0, rank) for epoch in (0, 1) for rank in range(24)]
    adapter = load_adapter(tiny_path("qwen2_vl"))
    assert all(same(item.encoded, encode_record(adapter, record, settings)) for item, record in zip(
        items, expected, strict=True))
    assert sorted(i.id for i in both[24:]) == sorted(i.id for i in items)
    assert [i.id for i in both[24:]] == [r.id for r in sorted(records, key=lambda r: record_hash(r.id, 3, 1))]
    # resume after the 9th key of the order: exactly the examples 10.. of the uninterrupted epoch
    resumed = list(iter_items(encoded_dataset(ordered(source, 3, range(0, 1), after_key=items[8].key), settings)))
    assert [i.id for i in resumed] == [i.id for i in items[9:]]
    assert all(same(a.encoded, b.encoded) for a, b in zip(resumed, items[9:], strict=True))


def write_shards(shapes: pathlib.Path, folder: pathlib.Path) -> list[dict]:
    """preference.json as three Parquet shards, the first with two row groups (4 read units)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((shapes / "preference.json").read_text())
    folder.mkdir(exist_ok=True)
    for index in range(3):
        pq.write_table(pa.Table.from_pylist(rows[index * 8:(index + 1) * 8]), folder / f"part-{index}.parquet",
                       row_group_size=4 if index == 0 else 8)
    return rows


def test_the_order_over_shards_is_windows_of_shuffled_units_whatever_the_encoders_and_blocks(
        ray_cluster, shapes, tiny_path, tmp_path, monkeypatch):
    import vlrlhf.data.pipeline as pipeline

    write_shards(shapes, tmp_path / "shards")
    source = source_of(str(tmp_path / "shards"), "plain_dpo")
    assert count_records(source) == [4, 4, 8, 8]
    windows = plan_windows([4, 4, 8, 8], 5, range(0, 2), window_rows=6)
    unit_ids = [[f"part-0.parquet:{row}" for row in range(1, 5)], [f"part-0.parquet:{row}" for row in range(5, 9)],
                [f"part-1.parquet:{row}" for row in range(1, 9)], [f"part-2.parquet:{row}" for row in range(1, 9)]]
    oracle = []  # the order written out from its definition: units of a window together, a hash inside
    for window in windows:
        ids = [i for unit in window.units for i in unit_ids[unit]]
        oracle += sorted(ids, key=lambda i, w=window: record_hash(i, 5, w.epoch))
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes))
    one = [i.id for i in iter_items(encoded_dataset(record_dataset(source, windows), settings))]
    monkeypatch.setattr(pipeline, "BLOCK_ROWS", 3)  # other blocks, two encoders, small encode batches
    two = [(i.id, i.key) for i in iter_items(encoded_dataset(
        record_dataset(source, windows), settings, batch_size=2,
        resources=PipelineResources(encoders=2, encoder_cpus=0.5)))]
    assert one == oracle == [i for i, _ in two] and len(one) == 48
    assert [k for _, k in two] == sorted(k for _, k in two)  # keys increase along the run
    assert sorted(one[:24]) == sorted(one[24:])  # each epoch: every record once
    assert [w.units for w in windows[:3]] != [w.units for w in windows[3:]]  # another unit order per epoch


def test_held_out_windows_give_exactly_one_row_per_record(ray_cluster, shapes, tiny_path, tmp_path):
    """A held-out record that fails to encode leaves an empty row (counted in the ledger), so the
    driver knows the stream's first num_held_out rows are the held-out set."""
    import ray

    path = write_bad_file(shapes)
    ledger = start_ledger("skip", tmp_path / "quarantine.jsonl")
    held_out = source_of(path, "plain_dpo", sink=BadRows("skip", ledger))
    counts = count_records(held_out)  # the read stage drops the rows it cannot convert (counted)
    train = source_of(str(shapes / "preference.json"), "plain_dpo")
    windows = [Window(0, 0, (0,), counts[0], source=1, exact=True), *plan_windows([24], 0, range(0, 1), 1024)]
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    rows = encoded_dataset(record_dataset((train, held_out), windows), settings,
                           sink=BadRows("skip", ledger)).take_all()
    assert counts == [8] and len(rows) == 8 + 24  # 3 rows of 11 are bad at reading: not records
    assert [r["id"] for r in rows[:8] if r["payload"]] == ["mixed.jsonl:1", "mixed.jsonl:2", "mixed.jsonl:9"]
    assert all(r["payload"] for r in rows[8:])  # five bad at encoding left an empty row each
    assert ray.get(ledger.counts.remote()) == EXPECTED_SKIPS


def test_shards_folders_globs_and_saved_datasets_read_the_same_records(ray_cluster, shapes, tmp_path):
    import datasets

    folder = tmp_path / "shards"
    rows = write_shards(shapes, folder)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert [u.part for u in expand_sources(str(folder / "part-0.parquet"))] == [0, 1]

    def contents(dataset) -> list[tuple]:
        import pickle

        found = [pickle.loads(row["record"])[0] for row in dataset.take_all()]
        return sorted((r.prompt[-1].content, r.chosen, r.rejected, r.images[0]) for r in found)

    oracle = contents(records_of(str(shapes / "preference.json"), "plain_dpo"))
    assert contents(records_of(str(folder), "plain_dpo")) == oracle
    assert contents(records_of(str(folder / "part-*.parquet"), "plain_dpo")) == oracle
    assert contents(records_of(str(saved), "plain_dpo")) == oracle
    ids = sorted(row["id"] for row in records_of(str(folder), "plain_dpo").take_all())
    assert ids[:2] == ["part-0.parquet:1", "part-0.parquet:2"] and "part-0.parquet:8" in ids  # row numbers per file
    with pytest.raises(ValueError, match="matches no"):
        expand_sources(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        expand_sources("hf:nobody/no-such-dataset")


def test_eval_split_never_leaks_into_training(ray_cluster, shapes):
    path = str(shapes / "sft.json")
    split = dict(eval_fraction=0.25, seed=0)
    train = {row["id"] for row in records_of(path, "llava", split="train", **split).take_all()}
    held_out = {row["id"] for row in records_of(path, "llava", split="eval", **split).take_all()}
    assert held_out and train and len(train) + len(held_out) == 24 and not train & held_out
    assert held_out == {i for i in train | held_out if in_eval_split(i, 0.25, 0)}  # by id: order cannot move rows


def write_bad_file(root: pathlib.Path) -> str:
    """Good rows 1, 2 and 9; every other row is bad for the reason in its prompt."""
    (root / "images" / "broken.png").write_bytes((root / "images" / "train" / "00000.png").read_bytes()[:60])
    from tests.data.test_images import png_header_only

    (root / "images" / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    (root.parent / "outside.png").write_bytes((root / "images" / "train" / "00000.png").read_bytes())
    good = {"image": "images/train/00001.png", "prompt": "What colour is the circle?", "chosen": "red",
            "rejected": "blue"}
    rows = [good, dict(good, image="images/train/00002.png"),
            {"image": "images/train/00003.png", "chosen": "red", "rejected": "blue"},  # missing prompt
            dict(good, chosen=7),  # wrong type
            dict(good, image="images/nope.png"),  # missing image
            dict(good, image="images/broken.png"),  # truncated image
            dict(good, image="../outside.png"),  # escapes image_root
            dict(good, prompt="<image> and <image>?"),  # 2 placeholders, 1 image
            dict(good, image="images/train/00004.png"),
            dict(good, prompt="What colour? " * 40),  # too long after expansion
            dict(good, image="images/bomb.png")]  # Pillow refuses it in Image.open
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


EXPECTED_SKIPS = {"missing_field": 1, "wrong_type": 1, "missing": 1, "truncated": 1, "path_outside_root": 1,
                  "image_count_mismatch": 1, "too_long_text": 1,
                  "too_many_pixels": 1}


def test_bad_records_raise_by_default_naming_file_and_row(ray_cluster, shapes, tiny_path):
    path = write_bad_file(shapes)
    with pytest.raises(BadRecordError, match=r"mixed.jsonl:row 3: missing_field: missing field 'prompt'"):
        raising_bad_records(records_of(path, "plain_dpo").count)
    skip = BadRows("skip", start_ledger("skip", None))
    good_only = records_of(path, "plain_dpo", sink=skip)
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    with pytest.raises(BadRecordError, match=r"mixed.jsonl:5: missing: no image file at .*nope.png"):
        raising_bad_records(encoded_dataset(good_only, settings, sink=BadRows("raise")).take_all)


def test_bad_records_skipped_counted_once_and_quarantined_with_two_pipeline_workers(ray_cluster, shapes, tiny_path,
                                                                                     tmp_path):
    import ray

    path = write_bad_file(shapes)
    ledger = start_ledger("skip", tmp_path / "quarantine.jsonl")
    sink = BadRows("skip", ledger)
    records = source_of(path, "plain_dpo", sink=sink)
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    two = PipelineResources(encoders=2, encoder_cpus=0.5)
    counts = raising_bad_records(count_records, records)
    # two epochs in one execution: every row is read and encoded twice, the counts must not add up
    items = list(iter_items(encoded_dataset(record_dataset(records, plan_windows(counts, 0, range(0, 2), 1024)),
                                            settings, sink=sink, batch_size=2, resources=two)))
    assert sorted(i.id for i in items) == sorted(["mixed.jsonl:1", "mixed.jsonl:2", "mixed.jsonl:9"] * 2)
    assert ray.get(ledger.counts.remote()) == EXPECTED_SKIPS
    lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(line["reason"] for line in lines) == sorted(EXPECTED_SKIPS)
    by_reason = {line["reason"]: line for line in lines}
    assert by_reason["missing_field"]["where"].endswith("mixed.jsonl:row 3")
    assert by_reason["missing_field"]["stage"] == "read"
    assert by_reason["too_long_text"]["where"] == "mixed.jsonl:10" and by_reason["too_long_text"]["stage"] == "encode"
    adapter = load_adapter(tiny_path("llava"))
    assert all(same(item.encoded, encode_record(adapter, item.record, settings)) for item in items)
    assert "skipped 8 bad record(s)" in ray.get(ledger.summary.remote())


def test_wrong_record_type_for_the_task(ray_cluster, shapes, tiny_path):
    import ray

    ledger = start_ledger("skip", None)
    records = records_of(str(shapes / "sft.json"), "llava").limit(2)
    settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference", image_root=str(shapes))
    assert encoded_dataset(records, settings, sink=BadRows("skip", ledger)).take_all() == []
    assert ray.get(ledger.counts.remote()) == {"wrong_record_type": 2}
