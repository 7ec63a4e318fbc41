"""The preference forward (adapter.pair_states) against today's separate forwards, the oracle:
per-pair log-probs and parameter gradients within 1e-5 in fp32, for every family, with the
vision tower run once per pair batch instead of twice."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.models.helpers import multi_turn, shape_image, single_turn, text_only
from vlrlhf.data.pipeline import PairBatch
from vlrlhf.models.logprobs import sequence_logprobs
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES
from vlrlhf.models.value_head import ScalarHead, last_token_scores, pair_last_token_scores
from vlrlhf.training import pair_logps, sequence_logps

TOLERANCE = dict(atol=1e-5, rtol=0)
_LOADED = {}


def loaded(tiny_path, family, attention="sdpa"):
    from vlrlhf.models.base import LoadOptions

    key = (family, attention)
    if key not in _LOADED:
        adapter = load_adapter(tiny_path(family))
        model = adapter.load_model(LoadOptions(attn_implementation=attention)).eval()
        _LOADED[key] = (adapter, model)
    return _LOADED[key]


def with_answer(messages, answer):
    return [*messages[:-1], {"role": "assistant", "content": answer}]


def pair_batch(adapter, padding_side="right") -> PairBatch:
    """Pairs of assorted lengths: answers that share their first words, one answer a prefix
    of the other, a multi-image conversation and a text-only one where the family takes them."""
    image = [shape_image("red")]
    rows = [(single_turn(answer="red circle one"), "red circle two", image),
            (single_turn("How many circles are there in this picture?", "one"), "three circles",
             [shape_image("green", (70, 56))]),
            (single_turn(answer="blue"), "blue circle on white", [shape_image("blue")])]
    if adapter.supports_multi_image:
        messages, images = multi_turn()
        rows.append((messages, "green", images))
    if adapter.supports_text_only:
        rows.append((text_only(), "two", []))
    chosen = [adapter.encode(messages, images) for messages, _, images in rows]
    rejected = [adapter.encode(with_answer(messages, answer), images) for messages, answer, images in rows]
    return PairBatch(adapter.collate(chosen, padding_side), adapter.collate(rejected, padding_side))


def count_vision_calls(adapter, model):
    calls = []
    handles = [module.register_forward_hook(lambda *_: calls.append(1)) for module in adapter.vision_modules(model)]
    return calls, handles


def gradients(model):
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_gradients(got: dict, want: dict):
    """Each parameter's gradient within 1e-5 of the oracle's, scaled by the tensor's largest
    entry where that exceeds 1: the tiny InstructBLIP's all-zero query tokens get gradients
    of ~1e7 through the Q-Former's LayerNorm, where one fp32 ulp is already ~1."""
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        scale = max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], atol=1e-5 * scale, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pair_forward_equals_separate_forwards_in_logps_and_gradients(family, padding_side, tiny_path):
    adapter, model = loaded(tiny_path, family)
    pairs = pair_batch(adapter, padding_side)
    model.zero_grad(set_to_none=True)
    # The oracle: chosen and rejected as two batches, the vision tower run for each.
    calls, handles = count_vision_calls(adapter, model)
    want_c, _ = sequence_logps(adapter, model, pairs.chosen)
    want_r, _ = sequence_logps(adapter, model, pairs.rejected)
    separate_calls = len(calls)
    (want_c.sum() - 0.7 * want_r.sum()).backward()
    want_grads = gradients(model)

    calls.clear()
    states = adapter.pair_states(model, pairs.chosen, pairs.rejected)
    assert states.packed and 0 < 2 * len(calls) == separate_calls  # the images went through once
    got = pair_logps(adapter, model, pairs)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got.chosen, want_c, **TOLERANCE)
    torch.testing.assert_close(got.rejected, want_r, **TOLERANCE)
    assert not torch.allclose(got.chosen, got.rejected)
    (got.chosen.sum() - 0.7 * got.rejected.sum()).backward()
    assert_same_gradients(gradients(model), want_grads)


@pytest.mark.parametrize("family", ["llava", "paligemma", "qwen2_vl"])
def test_eager_attention_takes_the_additive_mask(family, tiny_path):
    adapter, model = loaded(tiny_path, family, attention="eager")
    pairs = pair_batch(adapter)
    with torch.no_grad():
        want = [sequence_logps(adapter, model, batch)[0] for batch in (pairs.chosen, pairs.rejected)]
        states = adapter.pair_states(model, pairs.chosen, pairs.rejected)
        chosen, rejected = adapter.pair_token_logprobs(model, pairs.chosen, pairs.rejected)
    assert states.packed
    torch.testing.assert_close(sequence_logprobs(chosen, pairs.chosen.loss_mask), want[0], **TOLERANCE)
    torch.testing.assert_close(sequence_logprobs(rejected, pairs.rejected.loss_mask), want[1], **TOLERANCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_scores_of_a_pair_forward_equal_separate_forwards(family, tiny_path):
    adapter, model = loaded(tiny_path, family)
    pairs = pair_batch(adapter)
    torch.manual_seed(0)
    head = ScalarHead.create(model)
    model.zero_grad(set_to_none=True)
    want = [last_token_scores(adapter, model, head, batch) for batch in (pairs.chosen, pairs.rejected)]
    (want[0] - want[1]).sigmoid().log().sum().backward()
    want_grads = gradients(model)
    chosen, rejected = pair_last_token_scores(adapter, model, head, pairs.chosen, pairs.rejected)
    torch.testing.assert_close(chosen, want[0], **TOLERANCE)
    torch.testing.assert_close(rejected, want[1], **TOLERANCE)
    (chosen - rejected).sigmoid().log().sum().backward()
    assert_same_gradients(gradients(model), want_grads)


def test_pairs_with_different_images_fall_back_to_separate_forwards(tiny_path):
    adapter, model = loaded(tiny_path, "llava")
    messages = single_turn(answer="red")
    chosen = adapter.collate([adapter.encode(messages, [shape_image("red")])])
    rejected = adapter.collate([adapter.encode(with_answer(messages, "blue"), [shape_image("blue")])])
    with torch.no_grad():
        states = adapter.pair_states(model, chosen, rejected)
        got = pair_logps(adapter, model, PairBatch(chosen, rejected))
        want = sequence_logps(adapter, model, rejected)[0]
    assert not states.packed
    torch.testing.assert_close(got.rejected, want, **TOLERANCE)


def test_mdpo_corrupted_rows_and_the_reference_use_the_pair_forward(tiny_path):
    from actors.reference import reference_logps

    adapter, model = loaded(tiny_path, "qwen2_5_vl")
    pairs = pair_batch(adapter)
    noisy = [adapter.encode(single_turn(answer="red circle one"), [shape_image("black")])] * len(pairs.chosen)
    pairs = PairBatch(pairs.chosen, pairs.rejected, adapter.collate(noisy))
    calls, handles = count_vision_calls(adapter, model)
    with torch.no_grad():
        sequence_logps(adapter, model, pairs.chosen)
    once = len(calls)
    calls.clear()
    [got] = reference_logps(adapter, model, [pairs], torch.device("cpu"))
    assert len(calls) == 2 * once  # the pair once, the corrupted rows (their own images) once
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for value, batch in ((got.chosen, pairs.chosen), (got.rejected, pairs.rejected),
                             (got.corrupted, pairs.corrupted)):
            torch.testing.assert_close(value, sequence_logps(adapter, model, batch)[0], **TOLERANCE)


def test_flash_attention_gives_way_to_the_packed_forwards_sdpa(tiny_path):
    """Flash attention cannot take the shared-prefix mask: with model.packing (default) the
    training roles load SDPA; model.packing=false keeps the attention asked for and makes the
    adapter run separate rows."""
    from actors.common import load_options
    from vlrlhf.config import ModelSpec

    path = str(tiny_path("llava"))
    packed = ModelSpec(path=path, attention="flash_attention_2")
    assert load_options(packed).attn_implementation == "sdpa"
    separate = ModelSpec(path=path, attention="flash_attention_2", packing=False)
    assert load_options(separate).attn_implementation == "flash_attention_2"
    assert load_adapter(path, options=load_options(packed)).pair_forward == "packed"
    unpacked = load_adapter(path, options=dataclasses.replace(load_options(separate), attn_implementation="sdpa"))
    assert unpacked.pair_forward == "separate" and type(unpacked).pair_forward == "packed"
