"""Every family through the real adapter code: encode -> collate -> log-probs."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import label_spans, multi_turn, shape_image, single_turn, text_only
from vlrlhf.models.base import EncodeError
from vlrlhf.models.logprobs import sequence_logprobs
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES

_LOADED = {}


@pytest.fixture
def loaded(tiny_path):
    def get(family):
        if family not in _LOADED:
            adapter = load_adapter(tiny_path(family))
            _LOADED[family] = (adapter, adapter.load_model().eval())
        return _LOADED[family]

    return get


def conversation_for(adapter):
    if adapter.supports_multi_image:
        return multi_turn()
    return single_turn(), [shape_image("red")]


def seq_logps(adapter, model, examples, padding_side="right"):
    batch = adapter.collate(examples, padding_side=padding_side)
    with torch.no_grad():
        return sequence_logprobs(adapter.token_logprobs(model, batch), batch.loss_mask)


def assorted_examples(adapter):
    """Four examples of different lengths and image counts the family accepts."""
    messages, images = conversation_for(adapter)
    examples = [adapter.encode(messages, images),
                adapter.encode(single_turn("How many circles are there in this picture?", "one"),
                               [shape_image("green", (70, 56))]),
                adapter.encode(single_turn(answer="blue circle"), [shape_image("blue")])]
    if adapter.supports_text_only:
        examples.append(adapter.encode(text_only(), []))
    else:
        examples.append(adapter.encode(single_turn("Is it round?", "yes"), [shape_image("grey")]))
    return examples


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_answers(family, loaded):
    adapter, _ = loaded(family)
    messages, images = conversation_for(adapter)
    example = adapter.encode(messages, images)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not adapter.scores_every_turn:
        answers = answers[-1:]
    spans = label_spans(example.labels)
    assert [adapter.tokenizer.decode(span, skip_special_tokens=True).strip() for span in spans] == answers
    for span in spans:  # every answer teaches the model to stop
        assert adapter.tokenizer.eos_token_id in span
    scored = [i for i, label in enumerate(example.labels) if label != -100]
    assert all(example.input_ids[i] == example.labels[i] for i in scored)
    prompt_ids = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label == -100]
    prompt_text = adapter.tokenizer.decode(prompt_ids)
    assert "What colour is the circle?" in prompt_text


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_side_does_not_change_logprobs(family, loaded):
    adapter, model = loaded(family)
    examples = assorted_examples(adapter)
    right = seq_logps(adapter, model, examples, "right")
    left = seq_logps(adapter, model, examples, "left")
    assert torch.isfinite(right).all()
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_one_equals_its_row_in_a_batch_of_four(family, loaded):
    adapter, model = loaded(family)
    examples = assorted_examples(adapter)
    together = seq_logps(adapter, model, examples)
    alone = torch.cat([seq_logps(adapter, model, [example]) for example in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_language_model_and_projector_not_a_frozen_vision_tower(family, tiny_path):
    adapter = load_adapter(tiny_path(family))
    model = adapter.load_model()
    adapter.freeze_vision(model)
    vision = {id(p) for module in adapter.vision_modules(model) for p in module.parameters()}
    assert vision and not any(p.requires_grad for p in model.parameters() if id(p) in vision)
    batch = adapter.collate(assorted_examples(adapter))
    loss = -adapter.token_logprobs(model, batch).sum()
    loss.backward()
    decoder = adapter.language_model(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.layers.parameters())
    trainable_outside = [(name, p) for name, p in model.named_parameters()
                         if p.requires_grad and id(p) not in vision
                         and id(p) not in {id(q) for q in decoder.parameters()}]
    projector = [name for name, p in trainable_outside if p.grad is not None and p.grad.abs().sum() > 0]
    assert projector, "no gradient reached the projector"
    assert all(p.grad is None for p in model.parameters() if id(p) in vision)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_lie_inside_the_language_model(family, loaded):
    from peft import LoraConfig, get_peft_model

    adapter, _ = loaded(family)
    model = adapter.load_model()
    decoder = adapter.language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    targets = adapter.lora_targets(model)
    # q k v o gate up down per layer; GLM-4.1V fuses gate and up into one projection
    assert len(targets) == (6 if family == "glm4v" else 7) * len(decoder.layers)
    assert all(t.startswith(prefix + ".") for t in targets)
    vision_names = {name for name, m in model.named_modules()
                    if any(m is v or any(m is s for s in v.modules()) for v in adapter.vision_modules(model))}
    assert not vision_names & set(targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert len(lora) == 2 * len(targets)
    assert all(f".{prefix}." in name for name in lora)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_gives_identical_logits(family, loaded, tmp_path):
    adapter, model = loaded(family)
    torch.manual_seed(1)
    with torch.no_grad():  # move away from the initial weights, so the file must carry them
        for p in model.language_model.parameters() if hasattr(model, "language_model") else []:
            p.add_(torch.randn_like(p) * 1e-3)
    batch = adapter.collate(assorted_examples(adapter))
    model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    again = load_adapter(tmp_path)
    reloaded = again.load_model().eval()
    inputs = adapter.model_inputs(batch)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**again.model_inputs(batch)).logits)
    del _LOADED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_and_text_only_rows_share_a_batch(family, loaded):
    adapter, model = loaded(family)
    messages, images = multi_turn()
    rows = [(messages, images), (text_only(), []), (single_turn(), [shape_image()])]
    if not adapter.supports_multi_image:
        with pytest.raises(EncodeError, match="multi_image_unsupported"):
            adapter.encode(messages, images)
    if not adapter.supports_text_only:
        with pytest.raises(EncodeError, match="text_only_unsupported"):
            adapter.encode(*rows[1])
    accepted = [(m, i) for m, i in rows if (len(i) <= 1 or adapter.supports_multi_image)
                and (i or adapter.supports_text_only)]
    examples = [adapter.encode(m, i) for m, i in accepted]
    together = seq_logps(adapter, model, examples)
    alone = torch.cat([seq_logps(adapter, model, [e]) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_count_mismatch_names_the_record(family, loaded):
    adapter, _ = loaded(family)
    messages = single_turn()
    with pytest.raises(EncodeError, match=r"train\.jsonl:7.*1 <image> placeholder\(s\) but 2 image\(s\)") as info:
        adapter.encode(messages, [shape_image(), shape_image()], record="train.jsonl:7")
    assert info.value.reason == "image_count_mismatch"


@pytest.mark.parametrize("family", FAMILIES)
def test_over_long_examples_are_rejected_after_image_expansion(family, loaded):
    adapter, _ = loaded(family)
    messages, images = single_turn(), [shape_image()]
    example = adapter.encode(messages, images)
    assert adapter.encode(messages, images, max_length=len(example)).input_ids == example.input_ids
    text_tokens = len(adapter.tokenizer(adapter.render(messages, False))["input_ids"])
    assert text_tokens < len(example) - 1  # the unexpanded text alone would fit
    with pytest.raises(EncodeError, match="too_long") as info:
        adapter.encode(messages, images, max_length=len(example) - 1, record="data.json:3")
    assert info.value.reason == "too_long" and "data.json:3" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_tokens_do_not_see_the_future(family, loaded):
    adapter, model = loaded(family)
    image = [shape_image()]
    a = adapter.encode(single_turn(answer="red circle one"), image)
    b = adapter.encode(single_turn(answer="red circle two"), image)
    common = next(i for i, (x, y) in enumerate(zip(a.input_ids, b.input_ids, strict=False)) if x != y)
    with torch.no_grad():
        la = adapter.token_logprobs(model, adapter.collate([a]))[0, :common]
        lb = adapter.token_logprobs(model, adapter.collate([b]))[0, :common]
    assert (la != 0).any()
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_from_a_prompt(family, loaded):
    adapter, model = loaded(family)
    prompts = [adapter.encode_prompt(single_turn()[:1], [shape_image()]),
               adapter.encode_prompt(single_turn("How many circles are there?")[:1], [shape_image("blue")])]
    assert all(label == -100 for label in prompts[0].labels)
    batch = adapter.collate(prompts, padding_side="left")
    out = adapter.generate(model, batch, max_new_tokens=4)
    alone = adapter.generate(model, adapter.collate(prompts[1:], padding_side="left"), max_new_tokens=4)
    assert len(out) == 2 and out[1] == alone[0]
