"""A record's images are preprocessed once: the prefix tokenizations of `encode` and a pair's
chosen and rejected answers share the processor's output, and the encoding is unchanged."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from vlrlhf.data.pipeline import EncodeSettings, encode_record
from vlrlhf.data.records import PreferencePair
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES


def pair_record(image_path: str) -> PreferencePair:
    return PreferencePair(prompt=[{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
                          chosen="red", rejected="a blue circle", images=[image_path], id="pairs.json:1")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pair_preprocesses_its_image_once_and_encodes_as_before(family, tiny_path, tmp_path):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    adapter = load_adapter(tiny_path(family))
    settings = EncodeSettings(model_path=str(tiny_path(family)), task="preference", image_root=str(tmp_path))
    inner = adapter.processor.image_processor
    calls = []
    original = type(inner).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    type(inner).__call__ = counting
    try:
        shared = encode_record(adapter, pair_record("red.png"), settings)
    finally:
        type(inner).__call__ = original
    assert len(calls) == 1  # six processor calls (two answers x full text and two prefixes), one preprocessing
    assert adapter.processor.image_processor is inner  # restored
    pixels = [name for name in shared.chosen.extras if "pixel" in name]
    assert pixels and all(shared.chosen.extras[n] is shared.rejected.extras[n] for n in pixels)
    # the oracle: each answer encoded on its own, images preprocessed every time
    prompt = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}]
    image = Image.open(tmp_path / "red.png").convert("RGB")
    for encoded, answer in ((shared.chosen, "red"), (shared.rejected, "a blue circle")):
        alone = adapter.encode(prompt + [{"role": "assistant", "content": answer}], [image])
        assert encoded.input_ids == alone.input_ids and encoded.labels == alone.labels
        assert all(torch.equal(encoded.extras[k], alone.extras[k]) for k in alone.extras)
    # pickled (the pipeline's payload), the pair carries one copy of its pixels
    size = sum(shared.chosen.extras[n].numel() * shared.chosen.extras[n].element_size() for n in pixels)
    assert len(pickle.dumps(shared)) < 1.5 * size + 20_000


@pytest.mark.parametrize("family", FAMILIES)
def test_a_collated_pair_holds_one_copy_of_its_pixels_with_the_values_of_separate_collation(family, tiny_path,
                                                                                             tmp_path):
    from vlrlhf.data.pipeline import EncodedItem, collate_items

    for colour in ("red", "blue"):
        Image.new("RGB", (56, 56), colour).save(tmp_path / f"{colour}.png")
    adapter = load_adapter(tiny_path(family))
    settings = EncodeSettings(model_path=str(tiny_path(family)), task="preference", image_root=str(tmp_path))
    items = [pickle.loads(pickle.dumps(EncodedItem(key, f"pairs.json:{key}", None,
                                                   encode_record(adapter, pair_record(f"{colour}.png"), settings))))
             for key, colour in enumerate(("red", "blue"))]  # through pickle, as the pipeline hands them over
    batch = collate_items(adapter, items)
    pixels = [name for name in batch.chosen.extras if "pixel" in name]
    assert pixels and all(batch.rejected.extras[n] is batch.chosen.extras[n] for n in pixels)
    alone = adapter.collate([item.encoded.rejected for item in items])
    assert alone.extras.keys() == batch.rejected.extras.keys()
    assert all(torch.equal(batch.rejected.extras[k], alone.extras[k]) for k in alone.extras)
    # a rejected answer with its own copy of the pixels (equal values, another object) keeps its own
    items[1].encoded.rejected.extras = {k: v.clone() for k, v in items[1].encoded.rejected.extras.items()}
    separate = collate_items(adapter, items)
    assert all(separate.rejected.extras[n] is not separate.chosen.extras[n] for n in pixels)
    assert all(torch.equal(separate.rejected.extras[k], alone.extras[k]) for k in alone.extras)
    # moved to another device (meta: a real move with no data) the pair still holds one copy
    from vlrlhf.training import move_pairs

    moved = move_pairs(batch, "meta")
    assert all(moved.rejected.extras[n] is moved.chosen.extras[n] for n in pixels)
    assert all(moved.chosen.extras[n].device.type == "meta" for n in pixels)
    apart = batch.rejected.to("meta"), batch.chosen.to("meta")  # without the shared map: two copies
    assert all(apart[0].extras[n] is not apart[1].extras[n] for n in pixels)
