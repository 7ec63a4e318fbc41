"""Raw pixels: families whose processor rescales and normalises last (LLaVA, InstructBLIP,
PaliGemma) encode uint8 pixels and normalise them in model_inputs. The model must get the
very floats the processor returns by default, and score exactly as it did on them."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import shape_image, single_turn
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES

RAW = ("llava", "instructblip", "paligemma")


def two_examples(adapter):
    images = [shape_image("red", (56, 56)), shape_image("blue", (84, 50))]
    examples = [adapter.encode(single_turn(answer=answer), [image])
                for image, answer in zip(images, ("red", "a blue circle"), strict=True)]
    return images, examples


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_gets_the_processors_own_floats(family, tiny_path):
    adapter = load_adapter(tiny_path(family))
    images, examples = two_examples(adapter)
    encoded = examples[0].extras["pixel_values"]
    assert (encoded.dtype == torch.uint8) == (family in RAW)
    if family not in RAW:
        return  # their processors pad or patchify after normalising: pixels stay as processed
    # the oracle: the processor's default output (rescaled and normalised), image by image
    expected = torch.cat([adapter.processor.image_processor(image, return_tensors="pt")["pixel_values"]
                          for image in images])
    assert expected.dtype == torch.float32
    batch = adapter.collate(examples)
    assert batch.extras["pixel_values"].dtype == torch.uint8
    assert batch.extras["pixel_values"].nbytes * 4 == expected.nbytes
    inputs = adapter.model_inputs(batch)
    assert inputs["pixel_values"].dtype == torch.float32
    assert torch.equal(inputs["pixel_values"], expected)  # bit for bit
    assert batch.extras["pixel_values"].dtype == torch.uint8  # the batch itself is left as it was
    processor = adapter.pixel_normaliser  # constants set as lists (as a config might) give the same floats
    processor.image_mean, processor.image_std = list(processor.image_mean), list(processor.image_std)
    assert torch.equal(adapter.model_inputs(batch)["pixel_values"], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", RAW)
def test_log_probs_on_raw_pixels_equal_those_on_processed_pixels(family, dtype, tiny_path):
    from vlrlhf.models.base import LoadOptions

    adapter = load_adapter(tiny_path(family))
    model = adapter.load_model(LoadOptions(dtype=str(dtype).removeprefix("torch.")))
    images, examples = two_examples(adapter)
    raw = adapter.collate(examples).to("cpu", dtype)
    processed = adapter.collate(examples)
    processed.extras["pixel_values"] = torch.cat(
        [adapter.processor.image_processor(image, return_tensors="pt")["pixel_values"] for image in images])
    processed = processed.to("cpu", dtype)  # float pixels cast to the weights' dtype, as before
    assert raw.extras["pixel_values"].dtype == torch.uint8
    with torch.no_grad():
        assert torch.equal(adapter.token_logprobs(model, raw), adapter.token_logprobs(model, processed))
        chosen, rejected = adapter.collate(examples[:1]), adapter.collate(examples[:1])
        packed = adapter.pair_token_logprobs(model, chosen.to("cpu", dtype), rejected.to("cpu", dtype))
        alone = adapter.token_logprobs(model, chosen.to("cpu", dtype))
    assert torch.allclose(packed[0], alone, atol=1e-5 if dtype == torch.float32 else 5e-2)


def test_uint8_pixels_without_a_normaliser_are_an_error(tiny_path):
    adapter = load_adapter(tiny_path("llava"))
    batch = adapter.collate(two_examples(adapter)[1])
    adapter.pixel_normaliser = None  # e.g. an adapter of your own whose processor has no rescale_and_normalize
    with pytest.raises(ValueError, match="uint8 pixel_values"):
        adapter.model_inputs(batch)


def test_a_processor_that_ignores_the_raw_request_is_an_error_not_double_normalised_pixels(tiny_path):
    adapter = load_adapter(tiny_path("llava"))
    processor = adapter.processor

    class Ignoring:  # a processor that drops do_rescale/do_normalize and returns normalised floats
        def __call__(self, *args, do_rescale=None, do_normalize=None, **kwargs):
            return processor(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(processor, name)

    adapter.processor = Ignoring()
    with pytest.raises(ValueError, match="asked for uint8 pixels"):
        adapter.encode(single_turn(), [shape_image()])
