"""The image-token budget (data.image_overflow): a record over max_length after image
expansion is resized until it fits, skipped or raised, and never cut through its image
tokens. Per family: the resized record's image tokens are those its images give (the
model's forward takes it), its text and labels are untouched; families whose image-token
count does not fall with the pixels are bad records with that reason."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from PIL import Image

from vlrlhf.data.fit import ImageOverflowError, TooLong, fit, image_tokens
from vlrlhf.data.ledger import start_ledger
from vlrlhf.data.pipeline import BadRows, EncodeSettings, RecordSource, encode_record, encoded_dataset, iter_items, \
    record_dataset
from vlrlhf.data.sources import expand_sources
from vlrlhf.models.base import LoadOptions
from vlrlhf.models.registry import load_adapter

# families whose image tokens grow with the pixels, with the processor options that let them
RESIZABLE = {"qwen2_vl": {"max_pixels": 200_000}, "qwen3_vl": {"max_pixels": 200_000}, "internvl": {}}
FIXED = ["llava", "paligemma", "gemma3", "instructblip"]
MESSAGES = [{"role": "user", "content": "<image>\nWhat is drawn here?"},
            {"role": "assistant", "content": "A red square on a white field."}]


def photo(width=512, height=384) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    image.paste((200, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    return image


def adapter_of(tiny_path, family: str, options: dict | None = None):
    return load_adapter(tiny_path(family), options=LoadOptions(processor=tuple(sorted((options or {}).items()))))


def fitted(adapter, images, max_length: int, overflow: str = "resize"):
    return fit(functools.partial(adapter.encode, MESSAGES), images, max_length=max_length, overflow=overflow,
               placeholder_ids=adapter.placeholder_token_ids, record="data.json:1")


def answer(example) -> list[int]:
    return [token for token in example.labels if token != -100]


@pytest.mark.parametrize("family", RESIZABLE)
def test_resize_fits_the_budget_and_the_model_takes_the_result(family, tiny_path):
    adapter = adapter_of(tiny_path, family, RESIZABLE[family])
    image = photo()
    full = adapter.encode(MESSAGES, [image])
    ids = set(adapter.placeholder_token_ids())
    vision = image_tokens(full, ids)
    text = len(full) - vision
    max_length = text + vision // 2
    encoded, images, scale = fitted(adapter, [image], max_length)
    assert len(encoded) <= max_length < len(full) and 0 < scale < 1
    assert images[0].size == (round(512 * scale), round(384 * scale))
    again = adapter.encode(MESSAGES, images)  # the encoding is that of the images returned
    assert encoded.input_ids == again.input_ids and encoded.labels == again.labels
    assert len(encoded) - image_tokens(encoded, ids) == text  # only image tokens went
    assert answer(encoded) == answer(full)
    model = adapter.load_model().eval()
    with torch.no_grad():  # image features and image tokens agree, or the forward raises
        logits = model(**adapter.model_inputs(adapter.collate([encoded]))).logits
    assert logits.shape[:2] == (1, len(encoded))


@pytest.mark.parametrize("family", FIXED)
def test_fixed_resolution_families_refuse_with_the_reason(family, tiny_path):
    adapter = adapter_of(tiny_path, family)
    full = adapter.encode(MESSAGES, [photo()])
    with pytest.raises(TooLong, match="did not fit") as info:
        fitted(adapter, [photo()], len(full) - 1)
    assert info.value.reason == "too_long_images" and "data.json:1" in str(info.value)


def test_skip_raise_and_text_too_long(tiny_path):
    adapter = adapter_of(tiny_path, "qwen2_vl", RESIZABLE["qwen2_vl"])
    full = adapter.encode(MESSAGES, [photo()])
    vision = image_tokens(full, set(adapter.placeholder_token_ids()))
    assert fitted(adapter, [photo()], len(full))[2] == 1.0  # at the limit: untouched
    with pytest.raises(TooLong) as info:
        fitted(adapter, [photo()], len(full) - 1, overflow="skip")
    assert info.value.reason == "too_long"
    with pytest.raises(ImageOverflowError, match="data.json:1: .* exceed max_length"):
        fitted(adapter, [photo()], len(full) - 1, overflow="raise")
    with pytest.raises(TooLong) as info:
        fitted(adapter, [photo()], len(full) - vision - 1)  # the text alone is over
    assert info.value.reason == "too_long_text"


def test_the_pipeline_resizes_and_counts_in_the_ledger(ray_cluster, tiny_path, tmp_path):
    """Four records, three with large images: with resize each is kept (and counted with its
    scale); with skip the large ones are bad rows."""
    import ray

    for index, width in enumerate((512, 512, 96, 512)):
        photo(width, width * 3 // 4).save(tmp_path / f"{index}.png")
    rows = [{"image": f"{i}.png", "prompt": "What is drawn here?", "chosen": "A red square.",
             "rejected": "A blue circle."} for i in range(4)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    adapter = adapter_of(tiny_path, "qwen2_vl", RESIZABLE["qwen2_vl"])
    processor = tuple(sorted(RESIZABLE["qwen2_vl"].items()))
    max_length = 110
    for overflow, kept in (("resize", 4), ("skip", 1)):
        ledger = start_ledger("skip", tmp_path / f"{overflow}.jsonl")
        sink = BadRows("skip", ledger)
        source = RecordSource(tuple(expand_sources(str(tmp_path / "pairs.json"))), "plain_dpo", {}, sink=sink)
        settings = EncodeSettings(model_path=str(tiny_path("qwen2_vl")), task="preference",
                                  image_root=str(tmp_path), max_length=max_length, image_overflow=overflow,
                                  processor=processor)
        items = list(iter_items(encoded_dataset(record_dataset(source), settings, sink=sink)))
        assert len(items) == kept
        assert all(max(len(i.encoded.chosen), len(i.encoded.rejected)) <= max_length for i in items)
        resized = ray.get(ledger.resized.remote())
        if overflow == "resize":
            assert sorted(resized) == ["pairs.json:1", "pairs.json:2", "pairs.json:4"]
            assert all(0 < scale < 1 for scale in resized.values())
            oracle = encode_record(adapter, items[0].record, settings)
            assert oracle.chosen.input_ids == items[0].encoded.chosen.input_ids
            assert "resized the images of 3 record(s)" in ray.get(ledger.summary.remote())
        else:
            assert resized == {} and ray.get(ledger.counts.remote()) == {"too_long": 3}
