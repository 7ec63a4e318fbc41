"""Reading VLMEvalKit TSVs: index references, multi-image cells, and bad rows."""

from __future__ import annotations

import base64

import pytest

from tests.eval.fixtures import png_b64, write
from vlrlhf.data.reader import BadRecordError, BadRecords
from vlrlhf.eval.tsv import TSVError, read_tsv


def test_references_and_multi_image_cells_resolve_to_bytes(tmp_path):
    red, blue = png_b64((255, 0, 0)), png_b64((0, 0, 255))
    path = write(tmp_path / "b.tsv", [
        {"index": 0, "image": red, "question": "q0", "answer": "Yes", "category": "color"},
        {"index": 1, "image": "0", "question": "q1", "answer": "No", "category": "color"},  # reuses row 0's image
        {"index": 2, "image": str([blue, "0"]), "question": "q2", "answer": "No", "category": "color"},
    ])
    items = read_tsv(path, ("index", "question", "answer"))
    assert [i.images for i in items] == [[base64.b64decode(red)], [base64.b64decode(red)],
                                         [base64.b64decode(blue), base64.b64decode(red)]]
    assert items[1].image_key == "0" and items[0].image_key == "0" and items[2].image_key == "2"
    assert items[0].fields["category"] == "color" and items[1].answer == "No"


def test_a_list_cell_is_parsed_as_a_literal_never_executed(tmp_path):
    path = write(tmp_path / "b.tsv", [{"index": 0, "image": "[__import__('os').getcwd()]", "question": "q"}])
    with pytest.raises(BadRecordError, match="row 1 .*bad_image_list"):
        read_tsv(path)


def test_bad_rows_name_the_row_or_are_skipped_and_counted(tmp_path):
    rows = [{"index": 0, "image": png_b64(), "question": "good", "answer": "A"},
            {"index": 1, "image": "!!!not base64 at all, and longer than sixty-four characters so not a reference",
             "question": "corrupt", "answer": "A"},
            {"index": 2, "image": "17", "question": "dangling", "answer": "A"},
            {"index": 3, "image": png_b64(), "question": "also good", "answer": "B"}]
    path = write(tmp_path / "b.tsv", rows)
    with pytest.raises(BadRecordError, match=r"b.tsv:row 2 \(index 1\): corrupt_base64"):
        read_tsv(path)
    bad = BadRecords("skip", tmp_path / "quarantine.jsonl")
    items = read_tsv(path, bad=bad)
    assert [i.index for i in items] == ["0", "3"]
    assert dict(bad.counts) == {"corrupt_base64": 1, "dangling_reference": 1}
    assert "row 3 (index 2)" in (tmp_path / "quarantine.jsonl").read_text()


def test_a_missing_column_is_one_clear_error(tmp_path):
    path = write(tmp_path / "b.tsv", [{"index": 0, "image": png_b64(), "question": "q"}])
    with pytest.raises(TSVError, match="missing column.*answer"):
        read_tsv(path, ("index", "question", "answer"))
