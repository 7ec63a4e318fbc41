"""The group forward (adapter.group_rollout_logprobs: n completions of one prompt in one packed
row) against separate rows, the oracle: token log-probs and parameter gradients within 1e-5
in fp32, for every family and both padding sides; the plan itself checked by hand."""

from __future__ import annotations

import pytest
import torch

from tests.models.helpers import shape_image, single_turn, text_only
from tests.models.test_pair_forward import assert_same_gradients, count_vision_calls, gradients, loaded
from vlrlhf.models.batch import ModelBatch
from vlrlhf.models.groups import PADDING, PREFIX, groups_of, pack_groups
from vlrlhf.models.tiny import FAMILIES
from vlrlhf.rows import rl_example

TOLERANCE = dict(atol=1e-5, rtol=0)


def completion_ids(adapter, text: str) -> list[int]:
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


def grouped_rows(adapter, padding_side: str):
    """Three prompts (two images of different sizes, and a text-only one where the family
    takes it) with 3, 2 and 2 completions of assorted lengths, interleaved in the batch;
    one completion a prefix of another, two sharing their first words."""
    prompts = [(single_turn(), [shape_image("red")]),
               (single_turn("How many circles are there in this picture?"), [shape_image("green", (70, 56))])]
    if adapter.supports_text_only:
        prompts.append((text_only(), []))
    answers = [["red circle one", "red circle", "blue"], ["three circles", "one"], ["two", "two or three"]]
    encoded = [adapter.encode_prompt(messages[:-1], images) for messages, images in prompts]
    rows, keys = [], []
    for k in range(3):  # interleaved: a group's rows are not adjacent in the batch
        for p, prompt in enumerate(encoded):
            if k < len(answers[p]):
                rows.append(rl_example(prompt, completion_ids(adapter, answers[p][k]), adapter.completion_token_arrays))
                keys.append(p)
    groups = groups_of(keys)
    batch = adapter.collate(rows, padding_side)
    representatives = adapter.collate([rows[group[0]] for group in groups], padding_side)
    return batch, groups, representatives


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_group_forward_equals_separate_rows_in_logps_and_gradients(family, padding_side, tiny_path):
    adapter, model = loaded(tiny_path, family)
    batch, groups, representatives = grouped_rows(adapter, padding_side)
    model.zero_grad(set_to_none=True)
    calls, handles = count_vision_calls(adapter, model)
    want = adapter.rollout_logprobs(model, batch)
    weights = torch.linspace(0.5, 1.5, want.shape[0])[:, None]
    (want * weights).sum().backward()
    want_grads = gradients(model)
    separate_calls = len(calls)

    calls.clear()
    got, packed = adapter.group_rollout_logprobs(model, batch, groups, representatives)
    for handle in handles:
        handle.remove()
    assert packed and len(calls) == separate_calls  # the vision tower ran once, on one image per group
    mask = batch.loss_mask
    assert (got[~mask] == 0).all() and (got[mask] < 0).all()
    torch.testing.assert_close(got, want, **TOLERANCE)
    (got * weights).sum().backward()
    assert_same_gradients(gradients(model), want_grads)


def test_the_plan_by_hand():
    """Rows [5 6 7 8], [5 6 9] and [5 6 7], right padded, one group: the prefix is [5 6] (7 is
    not in all three), then each continuation with its own positions."""
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    batch = ModelBatch(ids, mask, torch.full_like(ids, -100), {})
    plan = pack_groups(batch, [[0, 1, 2]])
    assert plan.branch.tolist() == [[PREFIX, PREFIX, 1, 1, 2, 3]]
    assert plan.order.tolist() == [[0, 1, 2, 3, 2, 2]]
    assert plan.take(ids).tolist() == [[5, 6, 7, 8, 9, 7]]
    assert plan.index.tolist() == [[0, 1, 2, 3], [0, 1, 4, 0], [0, 1, 5, 0]]
    allowed = plan.allowed()[0].int().tolist()
    assert allowed[4] == [1, 1, 0, 0, 1, 0]  # row 1's token 9 sees the prefix and itself
    assert allowed[3] == [1, 1, 1, 1, 0, 0]  # row 0's token 8 sees its own row
    assert allowed[5] == [1, 1, 0, 0, 0, 1]
    two = pack_groups(batch, [[1], [0, 2]])  # a group of one and a group of two: [5 6 7] shared, then 8
    assert two.branch.tolist() == [[PREFIX, PREFIX, PREFIX, PADDING], [PREFIX, PREFIX, PREFIX, 1]]
    assert two.group_of.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="do not cover"):
        pack_groups(batch, [[0, 1]])


def test_rows_of_different_prompts_in_one_group_fall_back(tiny_path):
    """A group whose rows hold different images (a caller's mistake) is not packed: the image
    placeholders would lie after the fork."""
    adapter, model = loaded(tiny_path, "llava")
    prompts = [adapter.encode_prompt([{"role": "user", "content": f"{q}\n<image>"}], [shape_image(c)])
               for q, c in (("What colour?", "red"), ("Which shape is it?", "blue"))]
    rows = [rl_example(prompt, completion_ids(adapter, "red")) for prompt in prompts]
    batch = adapter.collate(rows)
    with torch.no_grad():
        got, packed = adapter.group_rollout_logprobs(model, batch, [[0, 1]], adapter.collate(rows[:1]))
        want = adapter.rollout_logprobs(model, batch)
    assert not packed
    torch.testing.assert_close(got, want, **TOLERANCE)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_a_policy_update_with_the_group_forward_equals_one_without(family, tiny_path):
    """collate_rl groups a micro-batch's rows by prompt (row.request): the PPO-clip loss, its
    metrics and the gradients equal those of the same rows scored separately."""
    import dataclasses

    from vlrlhf.config import OnlineSpec
    from vlrlhf.rows import Row, collate_rl, group_chunks
    from vlrlhf.training import rl_micro_step

    adapter, model = loaded(tiny_path, family)
    prompt = adapter.encode_prompt(single_turn()[:-1], [shape_image("red")])
    other = adapter.encode_prompt(single_turn("How many circles?")[:-1], [shape_image("blue", (70, 56))])
    rows = []
    for request, encoded, texts in ((0, prompt, ["red circle", "red", "a blue one"]), (1, other, ["one", "two"])):
        for k, text in enumerate(texts):
            ids = completion_ids(adapter, text)
            example = rl_example(encoded, ids, adapter.completion_token_arrays)
            rows.append(Row(example, request, [-2.0 - 0.1 * k] * len(ids), advantages=[0.5 - k * 0.4] * len(ids)))
    rows = [rows[i] for i in (0, 3, 1, 4, 2)]  # interleaved
    assert [[r.request for r in chunk] for chunk in group_chunks(rows, 4)] == [[0, 0, 0], [1, 1]]
    rl = collate_rl(adapter, rows, with_reference=False)
    assert rl.groups == [[0, 2, 4], [1, 3]] and len(rl.representatives) == 2
    online = OnlineSpec(rewards=[{"function": "exact_match"}])
    results = []
    for batch in (dataclasses.replace(rl, groups=None, representatives=None), rl):
        model.zero_grad(set_to_none=True)
        loss, metrics = rl_micro_step(adapter, model, batch, None, online, normaliser=10.0)
        loss.backward()
        results.append((loss.detach(), metrics, gradients(model)))
    (want, want_metrics, want_grads), (got, got_metrics, got_grads) = results
    assert want_metrics["packed_share_sum"] == 0 and got_metrics["packed_share_sum"] == len(rows)
    torch.testing.assert_close(got, want, **TOLERANCE)
    for key in ("policy_loss_sum", "ratio_sum", "tokens"):
        assert got_metrics[key] == pytest.approx(want_metrics[key], abs=1e-4)
    assert_same_gradients(got_grads, want_grads)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_critic_values_with_the_group_forward_equal_separate_rows(family, tiny_path):
    from vlrlhf.models.value_head import ScalarHead, token_values

    adapter, model = loaded(tiny_path, family)
    batch, groups, representatives = grouped_rows(adapter, "right")
    torch.manual_seed(0)
    head = ScalarHead.create(model)
    model.zero_grad(set_to_none=True)
    want = token_values(adapter, model, head, batch)
    want.sum().backward()
    want_grads = gradients(model)
    got = token_values(adapter, model, head, batch, groups, representatives)
    assert (got[~batch.loss_mask] == 0).all() and got[batch.loss_mask].abs().sum() > 0
    torch.testing.assert_close(got, want, **TOLERANCE)
    got.sum().backward()
    assert_same_gradients(gradients(model), want_grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_scores_with_the_group_forward_equal_separate_rows(family, tiny_path):
    from vlrlhf.models.value_head import ScalarHead, last_token_scores

    adapter, model = loaded(tiny_path, family)
    batch, groups, representatives = grouped_rows(adapter, "left")
    torch.manual_seed(1)
    head = ScalarHead.create(model)
    model.zero_grad(set_to_none=True)
    want = last_token_scores(adapter, model, head, batch)
    want.sum().backward()
    want_grads = gradients(model)
    got = last_token_scores(adapter, model, head, batch, groups, representatives)
    torch.testing.assert_close(got, want, **TOLERANCE)
    got.sum().backward()
    assert_same_gradients(gradients(model), want_grads)
