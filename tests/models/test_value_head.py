"""The scalar head: scores at the last real token, values aligned with the labels, saving."""

from __future__ import annotations

import pytest
import torch

from vlrlhf.models.registry import load_adapter
from vlrlhf.models.value_head import (ScalarHead, has_head, last_positions, last_token_scores, load_head, save_head,
                                      token_values)
from tests.actors.rollout_check import request


@pytest.fixture(scope="module")
def llava(tiny_path):
    adapter = load_adapter(str(tiny_path("llava")))
    model = adapter.load_model().eval()
    torch.manual_seed(0)
    return adapter, model, ScalarHead.create(model)


def examples(adapter):
    out = []
    for colour, answer in (("red", "red"), ("blue", "a blue circle on white")):
        req = request(colour)
        out.append(adapter.encode(req["messages"] + [{"role": "assistant", "content": answer}], req["images"]))
    return out


def test_last_positions_with_either_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert last_positions(mask).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="no real tokens"):
        last_positions(torch.zeros(1, 3))


@torch.no_grad()
def test_the_score_is_the_head_at_the_last_real_token_whatever_the_batch(llava):
    adapter, model, head = llava
    rows = examples(adapter)
    assert len(rows[0].input_ids) < len(rows[1].input_ids)  # the first row is right-padded in the batch
    alone = torch.cat([last_token_scores(adapter, model, head, adapter.collate([row])) for row in rows])
    together = last_token_scores(adapter, model, head, adapter.collate(rows))
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    hidden = adapter.hidden_states(model, adapter.collate([rows[0]]))[0, -1]  # by hand: w . h + b
    expected = float(hidden @ head.linear.weight[0] + head.linear.bias[0])
    assert float(alone[0]) == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_values_are_read_one_position_before_each_label(llava):
    adapter, model, head = llava
    batch = adapter.collate(examples(adapter))
    values = token_values(adapter, model, head, batch)
    hidden = adapter.hidden_states(model, batch)
    mask = batch.loss_mask
    for row in range(len(batch)):
        for t in mask[row].nonzero().flatten().tolist():  # V(s_t): the state token t is generated from
            assert float(values[row, t]) == pytest.approx(float(head(hidden[row, t - 1])), abs=1e-5)
    assert bool((values[~mask] == 0).all())


def test_the_head_saves_beside_the_model_and_loads_back(llava, tmp_path):
    _, model, head = llava
    assert not has_head(tmp_path)
    fresh = load_head(tmp_path, model)  # no saved head: a new one of the model's width
    assert fresh.linear.in_features == head.linear.in_features
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        load_head(tmp_path)
    save_head(head, tmp_path)
    loaded = load_head(tmp_path)
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
