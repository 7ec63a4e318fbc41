"""The Ray Data pipeline on a local Ray: same examples as the single-process encoder,
deterministic order, exact resume, no eval leakage, and the bad-record policy."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from vlrlhf.data.pipeline import (EncodedPair, EncodeSettings, encode_record, encoded_dataset, iter_batches,
                                  iter_encoded, ordered, split_records)
from vlrlhf.data.reader import BadRecordError, BadRecords, read_records
from vlrlhf.data.synthetic import synthesize
from vlrlhf.models.registry import load_adapter


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


def test_pipeline_equals_single_process_encoder_in_seeded_order(ray_cluster, shapes, tiny_path):
    records = ordered(read_records(str(shapes / "preference.json"), "plain_dpo"), seed=3)
    settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference", image_root=str(shapes))
    items = list(iter_encoded(encoded_dataset(records, settings, batch_size=4), BadRecords()))
    adapter = load_adapter(tiny_path("qwen2_vl"))
    assert [i.id for i in items] == [r.id for r in records]
    assert [i.position for i in items] == list(range(len(records)))
    assert all(same(item.encoded, encode_record(adapter, record, settings)) for item, record in zip(
        items, records, strict=True))
    again = list(iter_encoded(encoded_dataset(ordered(read_records(str(shapes / "preference.json"), "plain_dpo"),
                                                      seed=3), settings, batch_size=5), BadRecords()))
    assert [i.id for i in again] == [i.id for i in items]  # same seed, same order (other block sizes too)
    other = ordered(records, seed=4)
    assert [r.id for r in other] != [r.id for r in records]
    # resume from offset N yields examples N.. exactly
    resumed = list(iter_encoded(encoded_dataset(records, settings, start=9), BadRecords()))
    assert [i.position for i in resumed] == list(range(9, len(records)))
    assert all(same(a.encoded, b.encoded) for a, b in zip(resumed, items[9:], strict=True))
    # collated batches of pairs
    batches = list(iter_batches(iter(items), adapter, batch_size=5))
    assert [len(chunk) for chunk, _ in batches] == [5, 5, 5, 5, 4]
    pairs = batches[0][1]
    assert pairs.chosen.input_ids.shape[0] == pairs.rejected.input_ids.shape[0] == 5 and pairs.corrupted is None


def test_eval_split_never_leaks_into_training(shapes):
    records = read_records(str(shapes / "sft.json"), "llava")
    train, held_out = split_records(records, eval_fraction=0.25, seed=0)
    assert held_out and train and len(train) + len(held_out) == len(records)
    assert not {r.id for r in train} & {r.id for r in held_out}
    shuffled_train, shuffled_eval = split_records(ordered(records, seed=9), eval_fraction=0.25, seed=0)
    assert {r.id for r in shuffled_eval} == {r.id for r in held_out}  # order does not move rows across
    with pytest.raises(ValueError, match="eval_fraction=1.0"):
        split_records(records, eval_fraction=1.0)


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
        read_records(path, "plain_dpo")
    good_only = read_records(path, "plain_dpo", bad=BadRecords("skip"))
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    with pytest.raises(BadRecordError, match=r"mixed.jsonl:5: missing: no image file at .*nope.png"):
        list(iter_encoded(encoded_dataset(good_only, settings), BadRecords("raise")))


def test_bad_records_skipped_counted_and_quarantined(ray_cluster, shapes, tiny_path, tmp_path):
    path = write_bad_file(shapes)
    bad = BadRecords("skip", quarantine_path=tmp_path / "quarantine.jsonl")
    records = read_records(path, "plain_dpo", bad=bad)
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="preference", image_root=str(shapes),
                              max_length=80)
    items = list(iter_encoded(encoded_dataset(records, settings), bad))
    assert [i.id for i in items] == ["mixed.jsonl:1", "mixed.jsonl:2", "mixed.jsonl:9"]
    assert dict(bad.counts) == EXPECTED_SKIPS
    lines = [json.loads(line) for line in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(line["reason"] for line in lines) == sorted(EXPECTED_SKIPS)
    by_reason = {line["reason"]: line for line in lines}
    assert by_reason["missing_field"]["where"].endswith("mixed.jsonl:row 3")
    assert by_reason["missing_field"]["stage"] == "read"
    assert by_reason["too_long"]["where"] == "mixed.jsonl:10" and by_reason["too_long"]["stage"] == "encode"
    adapter = load_adapter(tiny_path("llava"))
    assert all(same(item.encoded, encode_record(adapter, item.record, settings)) for item in items)
    assert "skipped 8 bad record(s)" in bad.summary()


def test_wrong_record_type_for_the_task(ray_cluster, shapes, tiny_path):
    records = read_records(str(shapes / "sft.json"), "llava")[:2]
    settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference", image_root=str(shapes))
    bad = BadRecords("skip")
    assert list(iter_encoded(encoded_dataset(records, settings), bad)) == []
    assert bad.counts == {"wrong_record_type": 2}
