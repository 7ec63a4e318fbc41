"""Each public format on a small fixture written in that format."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlrlhf.data.formats import correction_spans
from vlrlhf.data.reader import BadRecords, BadRecordError, read_records
from vlrlhf.data.records import Conversation, KTOExample, PreferencePair, PromptRecord


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_plain_dpo_as_vl_rlhf_defines_it(tmp_path):
    path = write_json(tmp_path / "d.json", [
        {"image": "example.jpg", "prompt": "Describe this image in detail.", "chosen": "This is a cat.",
         "rejected": "This is a dog."},
        {"prompt": "No image here", "chosen": "a", "rejected": "b"}])
    first, second = read_records(path, "plain_dpo")
    assert isinstance(first, PreferencePair) and first.images == ["example.jpg"]
    assert first.prompt[0].content == "<image>\nDescribe this image in detail."
    assert (first.chosen, first.rejected, first.id) == ("This is a cat.", "This is a dog.", "d.json:1")
    assert second.images == [] and second.prompt[0].content == "No image here"


def test_vlquery_json_and_llava_conversations(tmp_path):
    vlquery = write_json(tmp_path / "q.json", [{"image": "a.jpg", "conversations": [
        {"from": "user", "value": "What is it?"}, {"from": "assistant", "value": "A cat."},
        {"from": "user", "value": "Colour?"}, {"from": "assistant", "value": "Black."}]}])
    (record,) = read_records(vlquery, "vlquery_json")
    assert isinstance(record, Conversation)
    assert [m.role for m in record.messages] == ["user", "assistant", "user", "assistant"]
    assert record.messages[0].content == "<image>\nWhat is it?"  # placeholder inserted
    llava = write_json(tmp_path / "l.json", [{"id": "x", "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image> and <image>: same?"},
        {"from": "gpt", "value": "No."}]}])
    (record,) = read_records(llava, "llava")
    assert record.images == ["a.jpg", "b.jpg"]
    assert record.messages[1].content == "<image> and <image>: same?"  # left where the user put them


def test_trl_conversational_preference_and_kto(tmp_path):
    rows = [{"images": ["a.png"],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "rejected": [{"role": "assistant", "content": "blue"}]}]
    (pair,) = read_records(write_jsonl(tmp_path / "p.jsonl", rows), "trl_preference")
    assert pair.prompt[0].content == "<image>Colour?" and (pair.chosen, pair.rejected) == ("red", "blue")
    kto_rows = [{"images": ["a.png"], "prompt": "Colour?", "completion": "red", "label": True},
                {"images": ["b.png"], "prompt": "Colour?", "completion": [{"role": "assistant", "content": "x"}],
                 "label": False}]
    good, bad = read_records(write_jsonl(tmp_path / "k.jsonl", kto_rows), "kto")
    assert isinstance(good, KTOExample) and good.desirable and not bad.desirable and bad.completion == "x"


def vlfeedback_row(ratings, prompt="What is shown?"):
    completions = [{"model": f"m{i}", "response": f"answer {i}", "annotations": {
        aspect: {"Rating": str(value), "Rationale": "..."} for aspect, value in zip(
            ("Helpfulness", "Ethical Considerations", "Visual Faithfulness"), scores, strict=True)}}
        for i, scores in enumerate(ratings)]
    return {"id": "1", "prompt": prompt, "img_path": "img.jpg", "completions": completions}


def test_vlfeedback_pairs_ordered_by_mean_rating_with_ties_and_margins(tmp_path):
    # means: 0 -> 4.0, 1 -> 2.0, 2 -> 4.0 (tie with 0), 3 -> 'N/A' (non-numeric)
    row = vlfeedback_row([(5, 4, 3), (1, 2, 3), (4, 4, 4), (5, 5, 5)])
    row["completions"][3]["annotations"]["Helpfulness"]["Rating"] = "N/A"
    path = write_json(tmp_path / "vlf.json", [row])
    bad = BadRecords()
    pairs = read_records(path, "vlfeedback", bad=bad)
    assert [(p.chosen, p.rejected, p.score_margin) for p in pairs] == [
        ("answer 0", "answer 1", 2.0), ("answer 2", "answer 1", 2.0)]
    assert bad.dropped_by_rule == {"non_numeric_rating": 1, "tie": 1}
    assert pairs[0].prompt[0].content == "<image>\nWhat is shown?" and pairs[0].images == ["img.jpg"]
    assert [p.id for p in pairs] == ["vlf.json:1:0", "vlf.json:1:1"]


def test_vlfeedback_score_margin_and_largest_gap_only(tmp_path):
    row = vlfeedback_row([(5, 5, 5), (4, 4, 4), (1, 1, 1)])  # means 5, 4, 1: gaps 1, 4, 3
    path = write_json(tmp_path / "vlf.json", [row])
    bad = BadRecords()
    margin = read_records(path, "vlfeedback", options={"score_margin": 3}, bad=bad)
    assert [(p.chosen, p.rejected) for p in margin] == [("answer 0", "answer 2"), ("answer 1", "answer 2")]
    assert bad.dropped_by_rule == {"below_margin": 1}
    (widest,) = read_records(path, "vlfeedback", options={"score_margin": -1})
    assert (widest.chosen, widest.rejected, widest.score_margin) == ("answer 0", "answer 2", 4.0)


def test_vlfeedback_column_wise_completions_from_hf_datasets(tmp_path):
    row = vlfeedback_row([(5, 5, 5), (1, 1, 1)])
    columns = {key: [c[key] for c in row["completions"]] for key in row["completions"][0]}
    row["completions"] = columns
    (pair,) = read_records(write_json(tmp_path / "v.json", [row]), "vlfeedback")
    assert (pair.chosen, pair.rejected) == ("answer 0", "answer 1")


def test_rlhfv_text_json_image_bytes_and_correction_spans(tmp_path):
    text = {"question": "Describe the image.", "chosen": "A black cat sits on a red mat.",
            "rejected": "A white dog sits on a red mat."}
    table = pa.table({"text": [json.dumps(text)], "image": [{"bytes": b"\x89PNG fake", "path": None}],
                      "image_path": ["x.png"]})
    path = tmp_path / "rlhfv.parquet"
    pq.write_table(table, path)
    (pair,) = read_records(str(path), "rlhfv")
    assert pair.images == [b"\x89PNG fake"]
    assert pair.prompt[0].content == "<image>\nDescribe the image."
    assert [pair.chosen[s:e] for s, e in pair.chosen_spans] == ["black cat"]
    explicit = dict(text, corrections=[[2, 11]])
    pq.write_table(pa.table({"text": [json.dumps(explicit)], "image_path": ["x.png"]}), path)
    (pair,) = read_records(str(path), "rlhfv")
    assert pair.chosen_spans == [(2, 11)] and pair.images == ["x.png"]  # preserved as given


def test_correction_spans_cover_replaced_and_added_words():
    chosen, rejected = "There are two cats on a red mat", "There are three cats on a blue mat"
    assert [chosen[s:e] for s, e in correction_spans(chosen, rejected)] == ["two", "red"]
    chosen, rejected = "A cat and a bowl.", "A cat."  # "cat." != "cat": punctuation counts
    assert [chosen[s:e] for s, e in correction_spans(chosen, rejected)] == ["cat and a bowl."]
    chosen, rejected = "A small red cat sits", "A cat sits"  # words only the correction has
    assert [chosen[s:e] for s, e in correction_spans(chosen, rejected)] == ["small red"]
    assert correction_spans("same words", "same words") == []


def test_rlaifv_and_prompts(tmp_path):
    table = pa.table({"question": ["Q?"], "chosen": ["yes"], "rejected": ["no"],
                      "image": [{"bytes": b"img", "path": "p.jpg"}], "idx": [3]})
    pq.write_table(table, tmp_path / "r.parquet")
    (pair,) = read_records(str(tmp_path / "r.parquet"), "rlaifv")
    assert pair.images == [b"img"] and pair.chosen == "yes"
    path = write_jsonl(tmp_path / "p.jsonl", [{"image": "a.png", "prompt": "Count?", "answer": 3, "task": "count"},
                                              {"prompt": "Hi", "images": []}])
    first, second = read_records(path, "prompts")
    assert isinstance(first, PromptRecord) and first.answer == "3" and first.metadata == {"task": "count"}
    assert second.answer is None and second.images == []


def test_user_converter_by_import_path(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"q": "Why?", "good": "because", "bad": "no"}])
    (pair,) = read_records(path, "tests.data.user_format:convert")
    assert (pair.prompt[0].content, pair.chosen) == ("Why?", "because")
    with pytest.raises(ValueError, match="data.format='nope' is not one of"):
        read_records(path, "nope")


def test_missing_file_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match="data file .*missing.json does not exist"):
        read_records(str(tmp_path / "missing.json"), "plain_dpo")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: invalid JSON at line 1"):
        read_records(str(tmp_path / "broken.json"), "plain_dpo")
    (tmp_path / "lines.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    with pytest.raises(BadRecordError, match=r"lines.jsonl:row 2: bad_json: invalid JSON"):
        read_records(str(tmp_path / "lines.jsonl"), "plain_dpo")
