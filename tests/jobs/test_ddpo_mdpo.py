"""DDPO token weights and mDPO corrupted images, from the records to the training step."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from PIL import Image

from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import shard
from vlrlhf.config import AlgorithmSpec, MDPOSpec, ModelSpec, TrainerSpec
from vlrlhf.data.corrupt import corrupt_image
from vlrlhf.data.pipeline import EncodedItem, EncodeSettings, encode_record
from vlrlhf.data.records import PreferencePair
from vlrlhf.data.token_weights import last_answer_positions
from vlrlhf.models.registry import load_adapter
from vlrlhf.training import sequence_logps

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "shapes"
IMAGE = "images/train/00000.png"


def pair(chosen, rejected, spans=None, index=0):
    return PreferencePair(id=f"t:{index}", prompt=[{"role": "user", "content": "<image>\nDescribe it."}],
                          chosen=chosen, rejected=rejected, images=[IMAGE], chosen_spans=spans)


@pytest.fixture(scope="module")
def llava(tiny_path):
    path = tiny_path("llava")
    return path, load_adapter(path)


def test_ddpo_weights_land_on_the_corrected_tokens(llava):
    path, adapter = llava
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA), ddpo_gamma=5.0)
    record = pair("There are two red circles on the mat", "There are three blue circles on the mat")
    encoded = encode_record(adapter, record, settings)
    for example, changed, same in ((encoded.chosen, ("two", "red"), ("There", "circles", "mat")),
                                   (encoded.rejected, ("three", "blue"), ("There", "circles", "mat"))):
        positions = last_answer_positions(example.labels)
        heavy = [p for p in positions if example.label_weights[p] == 5.0]
        light = [p for p in positions if example.label_weights[p] == 1.0]
        assert heavy and len(heavy) + len(light) == len(positions)
        heavy_text = adapter.tokenizer.decode([example.input_ids[p] for p in heavy])
        light_text = adapter.tokenizer.decode([example.input_ids[p] for p in light])
        assert all(word in heavy_text for word in changed)
        assert not any(word in light_text for word in changed)
        assert all(word in light_text for word in same)
        # tokens outside the answer keep weight 1
        assert all(w == 1.0 for i, w in enumerate(example.label_weights) if i not in positions)
    # explicit spans from the data win over the automatic word diff
    explicit = encode_record(adapter, pair(record.chosen, record.rejected, spans=[(10, 13)]), settings)
    heavy = [p for p in last_answer_positions(explicit.chosen.labels) if explicit.chosen.label_weights[p] == 5.0]
    assert adapter.tokenizer.decode([explicit.chosen.input_ids[p] for p in heavy]).strip() == "two"


def test_ddpo_score_is_the_weighted_mean_of_token_logprobs(llava):
    path, adapter = llava
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA), ddpo_gamma=3.0)
    records = [pair("A big red square", "A small red square", index=0), pair("One green circle", "Two green circles",
                                                                                index=1)]
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records)]
    (micro,), = shard(items, 1, 2, adapter)
    model = adapter.load_model().eval()
    with torch.no_grad():
        scores, lengths = sequence_logps(adapter, model, micro.chosen)
        token_logps = adapter.token_logprobs(model, micro.chosen)
    for row, item in enumerate(items):
        example = item.encoded.chosen
        labelled = [t for t, label in enumerate(example.labels) if label != -100]
        weights = [example.label_weights[t] for t in labelled]
        expected = sum(w * float(token_logps[row, t]) for w, t in zip(weights, labelled, strict=True)) / sum(weights)
        assert float(scores[row]) == pytest.approx(expected, rel=1e-5)
        assert int(lengths[row]) == len(labelled) and 3.0 in weights and 1.0 in weights


def test_corrupted_image_is_a_seeded_small_crop_of_the_same_size():
    image = Image.new("RGB", (64, 48))
    for x in range(64):
        for y in range(48):
            image.putpixel((x, y), (x * 4, y * 5, 0))
    a, b = corrupt_image(image, "rec:1"), corrupt_image(image, "rec:1")
    assert a.size == image.size and a.tobytes() == b.tobytes()  # deterministic per key
    assert corrupt_image(image, "rec:2").tobytes() != a.tobytes()
    # the crop covers a small region: the corrupted image spans a narrow range of the x gradient
    reds = [a.getpixel((x, 20))[0] for x in range(64)]
    assert max(reds) - min(reds) <= 4 * round(64 * math.sqrt(0.2)) + 4
    with pytest.raises(ValueError, match="min_keep"):
        corrupt_image(image, "k", 0.5, 0.1)


def test_mdpo_step_zero_loss_and_corrupted_rows(llava):
    path, adapter = llava
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA), corrupt_keep=(0.01, 0.2))
    records = [pair("A red square", "A blue circle", index=i) for i in range(4)]
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records)]
    first = items[0].encoded
    assert first.corrupted.input_ids == first.chosen.input_ids  # same answer, same number of image tokens
    assert not torch.equal(first.corrupted.extras["pixel_values"], first.chosen.extras["pixel_values"])
    anchor = 0.3
    model = ModelSpec(path=str(path))
    algorithm = AlgorithmSpec(name="dpo", beta=0.1, mdpo=MDPOSpec(image_weight=0.5, anchor=anchor, anchor_weight=2.0))
    trainer = TrainerSpec(lr=1e-3, lr_schedule="constant", batch_size=4, micro_batch_size=2)
    policy = PolicyWorker(model, algorithm, trainer, 10)
    reference = ReferenceWorker(model)
    shards = shard(items, 1, 2, adapter)
    result = policy.train_step(shards[0], reference.logprobs(shards[0]), 4.0)
    total = sum(s["loss_sum"] for s in result["sums"]) / 4
    # identical policy and reference: every log-ratio is 0, so each term is at its value at 0
    expected = math.log(2) + 0.5 * math.log(2) + 2.0 * -math.log(1 / (1 + math.exp(anchor)))
    assert total == pytest.approx(expected, abs=1e-5)
    assert sum(s["image_loss_sum"] for s in result["sums"]) / 4 == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="options of algorithm.name=dpo"):
        AlgorithmSpec(name="kto", ddpo_gamma=5.0)
