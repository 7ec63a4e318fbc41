"""Adapter lookup, tiny checkpoints in hub layout, and the CLI surface."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.models.helpers import shape_image, single_turn
from vlrlhf.models.registry import ADAPTERS, load_adapter
from vlrlhf.models.tiny import BUILDERS, FAMILIES, build_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_every_weight_from_disk(family, tiny_path):
    path = tiny_path(family)
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.manual_seed(0)  # the builder's seed: the same random weights in memory
    config, _ = BUILDERS[family]()
    fresh = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in fresh.state_dict().items())
    assert json.loads((path / "vlrlhf_tiny.json").read_text())["family"] == family
    assert ADAPTERS[model.config.model_type]  # every tiny family has a built-in adapter


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "paligemma", "gemma3"])
def test_clip_and_siglip_towers_are_saved_in_hub_layout(family, tiny_path):
    from safetensors import safe_open

    with safe_open(tiny_path(family) / "model.safetensors", "pt") as handle:
        towers = [key for key in handle.keys() if key.startswith("vision_tower.")]
    assert towers and all(key.startswith("vision_tower.vision_model.") for key in towers)


def test_custom_adapter_by_import_path(tiny_path):
    adapter = load_adapter(tiny_path("llava"), adapter="tests.models.custom_adapter:ShoutingLlavaAdapter")
    assert type(adapter).__name__ == "ShoutingLlavaAdapter"
    example = adapter.encode(single_turn(), [shape_image()])
    assert "WHAT COLOUR IS THE CIRCLE?" in adapter.tokenizer.decode(example.input_ids)


@pytest.mark.parametrize("spec, message", [
    ("tests.models.custom_adapter:NOT_AN_ADAPTER", "not a subclass"),
    ("tests.models.custom_adapter:Missing", "has no 'Missing'"),
    ("no_such_package.module:Adapter", "cannot import"),
    ("no_colon", "must look like"),
])
def test_bad_adapter_specs_are_named(spec, message, tiny_path):
    with pytest.raises(ValueError, match=message) as info:
        load_adapter(tiny_path("llava"), adapter=spec)
    assert spec in str(info.value)


def test_unknown_model_type_and_missing_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip_2000"}))
    with pytest.raises(ValueError, match="'blip_2000' has no built-in adapter"):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        load_adapter(tmp_path / "nowhere")


def test_qwen_image_only_processor_matches_the_stock_one(tiny_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from vlrlhf.models.qwen2_vl import ImageOnlyQwen2VLProcessor, Qwen2VLAdapter

    stock = load_adapter(tiny_path("qwen2_vl"))
    path = tiny_path("qwen2_vl")
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path),
        chat_template=stock.processor.chat_template)
    fallback = Qwen2VLAdapter(processor, config=stock.config, path=str(path))
    messages, images = single_turn(), [shape_image(size=(84, 56))]
    a, b = stock.encode(messages, images), fallback.encode(messages, images)
    assert a.input_ids == b.input_ids and a.labels == b.labels and a.token_arrays == b.token_arrays
    assert torch.equal(a.extras["pixel_values"], b.extras["pixel_values"])


def test_building_twice_with_one_seed_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    first = load_file(build_tiny_model("qwen2_vl", tmp_path / "a", seed=3) / "model.safetensors")
    second = load_file(build_tiny_model("qwen2_vl", tmp_path / "b", seed=3) / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="family='gpt5' is not one of"):
        build_tiny_model("gpt5", tmp_path / "c")


def test_processor_options_set_the_image_resolution(tiny_path):
    """model.processor reaches the processor: Qwen2-VL's max_pixels resizes (not rejects) a
    56x56 image to 28x28, four times fewer image tokens (one token per 2x2 patches of 14)."""
    from PIL import Image

    from vlrlhf.models.base import LoadOptions
    from vlrlhf.models.registry import load_adapter

    image = Image.new("RGB", (56, 56), "red")
    conversation = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]

    def image_tokens(options):
        adapter = load_adapter(tiny_path("qwen2_vl"), options=options)
        encoded = adapter.encode(conversation, [image])
        pad = adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return encoded.input_ids.count(pad)

    assert image_tokens(LoadOptions()) == 4  # (56 / 14)^2 patches, merged 2x2
    assert image_tokens(LoadOptions(processor=(("max_pixels", 28 * 28),))) == 1
