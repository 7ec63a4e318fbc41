"""The Ray Data pipeline on a local Ray: same examples as the single-process encoder,
a seeded order independent of block layout, exact resume by key, shards and folders and
save_to_disk datasets as sources, no eval leakage, and the bad-record policy in tasks."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from vlrlhf.data.ledger import start_ledger
from vlrlhf.data.pipeline import (BadRows, EncodedPair, EncodeSettings, RecordSource, encode_record,
                                  encoded_dataset, epoch_dataset, in_eval_split, iter_items, order_key,
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


def records_of(paths, data_format: str, **kwargs):
    return record_dataset(RecordSource(tuple(expand_sources(paths)), data_format, **kwargs))


def test_pipeline_equals_single_process_encoder_in_seeded_order(ray_cluster, shapes, tiny_path):
    records = read_records(str(shapes / "preference.json"), "plain_dpo")  # the single-process oracle
    settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference", image_root=str(shapes))
    dataset = records_of(str(shapes / "preference.json"), "plain_dpo")
    items = list(iter_items(encoded_dataset(epoch_dataset(dataset, 3, 0), settings, batch_size=4)))
    expected = sorted(records, key=lambda r: order_key(r.id, 3, 0))
    assert [i.id for i in items] == [r.id for r in expected] and len(items) == 24
    assert [i.key for i in items] == sorted(order_key(r.id, 3, 0) for r in records)
    adapter = load_adapter(tiny_path("qwen2_vl"))
    assert all(same(item.encoded, encode_record(adapter, record, settings)) for item, record in zip(
        items, expected, strict=True))
    other_epoch = [i.id for i in iter_items(encoded_dataset(epoch_dataset(dataset, 3, 1), settings))]
    assert sorted(other_epoch) == sorted(i.id for i in items) and other_epoch != [i.id for i in items]
    # resume after the 9th key of the order: exactly the examples 10.. of the uninterrupted epoch
    resumed = list(iter_items(encoded_dataset(epoch_dataset(dataset, 3, 0, after_key=items[8].key), settings)))
    assert [i.id for i in resumed] == [i.id for i in items[9:]]
    assert all(same(a.encoded, b.encoded) for a, b in zip(resumed, items[9:], strict=True))


def test_shards_folders_globs_and_saved_datasets_read_the_same_records(ray_cluster, shapes, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((shapes / "preference.json").read_text())
    folder = tmp_path / "shards"
    folder.mkdir()
    for index in range(3):  # three shards, the first with two row groups
        pq.write_table(pa.Table.from_pylist(rows[index * 8:(index + 1) * 8]), folder / f"part-{index}.parquet",
                       row_group_size=4 if index == 0 else 8)
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
                  "image_count_mismatch": 1, "too_long": 1,
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

    from vlrlhf.data.pipeline import PipelineResources

    path = write_bad_file(shapes)
    ledger = start_ledger("skip", tmp_path / "quarantine.jsonl")
    sink = BadRows("skip", ledger)
    records = records_of(path, "plain_dpo", sink=sink)
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    two = PipelineResources(task_cpus=0.5, concurrency=2)
    for epoch in range(2):  # every epoch re-reads and re-encodes: counts must not add up
        items = list(iter_items(encoded_dataset(epoch_dataset(records, 0, epoch), settings, sink=sink,
                                                batch_size=2, resources=two)))
        assert sorted(i.id for i in items) == ["mixed.jsonl:1", "mixed.jsonl:2", "mixed.jsonl:9"]
    assert ray.get(ledger.counts.remote()) == EXPECTED_SKIPS
    lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(line["reason"] for line in lines) == sorted(EXPECTED_SKIPS)
    by_reason = {line["reason"]: line for line in lines}
    assert by_reason["missing_field"]["where"].endswith("mixed.jsonl:row 3")
    assert by_reason["missing_field"]["stage"] == "read"
    assert by_reason["too_long"]["where"] == "mixed.jsonl:10" and by_reason["too_long"]["stage"] == "encode"
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


def test_the_sort_splits_into_blocks_by_key_range_and_keeps_the_order(ray_cluster, shapes, monkeypatch):
    import vlrlhf.data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "BLOCK_ROWS", 4)  # 24 records -> 6 key ranges
    dataset = records_of(str(shapes / "preference.json"), "plain_dpo")
    whole = [row["id"] for row in epoch_dataset(dataset, 5, 0).take_all()]
    split = epoch_dataset(dataset, 5, 0, rows=24).materialize()
    assert [row["id"] for row in split.take_all()] == whole  # the same order
    assert split.num_blocks() >= 4  # in pieces the next stages can take in parallel
