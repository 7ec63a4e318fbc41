"""The critic regresses onto returns; the reward-model role scores completions as its head says."""

from __future__ import annotations

import shutil

import pytest
import torch

from actors.critic import CriticWorker
from actors.reward import RewardModelWorker
from vlrlhf.rows import Row, collate_values, rl_example, scatter, scoring_batches
from tests.actors.rollout_check import request
from vlrlhf.config import CriticSpec, ModelSpec, TrainerSpec
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.value_head import ScalarHead, last_token_scores, load_head, save_head


def rows_for(adapter):
    out = []
    for index, (colour, completion) in enumerate((("red", [5, 6, 7]), ("blue", [8, 9]), ("green", [10, 11, 12, 13]))):
        req = request(colour)
        prompt = adapter.encode_prompt(req["messages"], req["images"])
        out.append(Row(rl_example(prompt, completion), index, [0.0] * len(completion)))
    return out


def test_the_critic_regresses_onto_fixed_returns(tiny_path):
    path = str(tiny_path("llava"))
    trainer = TrainerSpec(lr=1e-3, lr_schedule="constant", max_grad_norm=None, seed=0)
    critic = CriticWorker(ModelSpec(path=path), CriticSpec(lr=1e-3, value_clip=None), trainer, total_steps=40)
    critic.setup_distributed("127.0.0.1", 0, 0, 1)
    rows = rows_for(critic.adapter)
    targets = [[1.0, 0.5, -0.5], [2.0, -1.0], [0.0, 0.3, 0.6, 0.9]]
    batches = scoring_batches(critic.adapter, rows, micro_batch_size=2)

    def mse() -> float:
        values = scatter(critic.values(batches), batches)
        assert [len(v) for v in values] == [3, 2, 4]  # one value per completion token
        errors = [(v - t) ** 2 for vs, ts in zip(values, targets, strict=True) for v, t in zip(vs, ts, strict=True)]
        return sum(errors) / len(errors)

    before = mse()
    for row, values, returns in zip(rows, scatter(critic.values(batches), batches), targets, strict=True):
        row.values, row.returns = values, returns
    for _ in range(30):
        result = critic.train_step([collate_values(critic.adapter, rows)], normaliser=9.0)
    after = mse()
    assert after < 0.2 * before, (before, after)
    assert result["sums"][0]["count"] == 9.0


@torch.no_grad()
def test_the_reward_model_role_scores_at_the_last_token(tiny_path, tmp_path):
    folder = tmp_path / "rm"
    shutil.copytree(tiny_path("llava"), folder)
    with pytest.raises(FileNotFoundError, match="algorithm.name=reward"):
        RewardModelWorker(str(folder))
    adapter = load_adapter(str(folder))
    model = adapter.load_model().eval()
    torch.manual_seed(3)
    save_head(ScalarHead.create(model), folder)
    items = [dict(request(colour), completion=answer) for colour, answer in (("red", "red"), ("blue", "a circle"))]
    one = RewardModelWorker(str(folder), micro_batch_size=1).score(items)
    two = RewardModelWorker(str(folder), micro_batch_size=2).score(items)
    assert one == pytest.approx(two, abs=1e-4)  # padding does not move the score
    head = load_head(folder)
    for item, score in zip(items, one, strict=True):  # the oracle: encode the full chat, read the head by hand
        example = adapter.encode(item["messages"] + [{"role": "assistant", "content": item["completion"]}],
                                 item["images"])
        expected = last_token_scores(adapter, model, head, adapter.collate([example]))
        assert score == pytest.approx(float(expected[0]), abs=1e-5)
    assert one[0] != pytest.approx(one[1], abs=1e-6)  # the completion matters
    # a GRPO step's items: three answers to one prompt, two to another, interleaved; with the
    # prompts as keys each micro-batch packs a prompt's answers into one row (the group forward)
    red, blue = request("red"), request("blue")
    items = [dict(red, completion="red"), dict(blue, completion="blue"), dict(red, completion="a red circle"),
             dict(blue, completion="two"), dict(red, completion="red circle")]
    keys = [0, 1, 0, 1, 0]
    worker = RewardModelWorker(str(folder), micro_batch_size=4)
    separate, grouped = worker.score(items), worker.score(items, keys=keys)
    assert grouped == pytest.approx(separate, abs=1e-5)
    assert len(set(round(x, 4) for x in grouped)) == 5


def test_a_lora_critic_trains_adapters_and_head_only_and_resumes_exactly(tiny_path, tmp_path):
    """online.critic.lora: the backbone stays frozen (no Adam state for it); the adapters and the
    head learn; save + load_state into a fresh critic continues with the same next step."""
    from vlrlhf.config import LoraSpec

    path = str(tiny_path("llava"))
    trainer = TrainerSpec(lr=1e-2, lr_schedule="constant", max_grad_norm=None, seed=0)
    spec = CriticSpec(lr=1e-2, value_clip=None, lora=LoraSpec(r=4, alpha=8))

    def make() -> CriticWorker:
        worker = CriticWorker(ModelSpec(path=path), spec, trainer, total_steps=10)
        worker.setup_distributed("127.0.0.1", 0, 0, 1)
        return worker

    critic = make()
    trainable = {n for n, p in critic.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    frozen = {n: p.detach().clone() for n, p in critic.model.named_parameters() if not p.requires_grad}
    rows = rows_for(critic.adapter)
    batches = scoring_batches(critic.adapter, rows, micro_batch_size=3)
    initial = critic.values(batches)[0]
    for row, values, returns in zip(rows, scatter(critic.values(batches), batches),
                                    [[1.0, 0.5, -0.5], [2.0, -1.0], [0.0, 0.3, 0.6, 0.9]], strict=True):
        row.values, row.returns = values, returns
    step = [collate_values(critic.adapter, rows)]
    critic.train_step(step, normaliser=9.0)
    adam = sum(t.numel() for s in critic.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    lora_and_head = sum(p.numel() for p in critic.parameters)
    assert adam == 2 * lora_and_head  # exp_avg and exp_avg_sq of the adapters and head only
    assert lora_and_head < 0.2 * sum(p.numel() for p in critic.model.parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in critic.model.named_parameters() if n in frozen)
    assert not torch.allclose(critic.values(batches)[0], initial)  # the adapters and head moved the values
    critic.save(str(tmp_path / "critic"))
    critic.train_step(step, normaliser=9.0)
    resumed = make()
    resumed.load_state(str(tmp_path / "critic"))
    resumed.train_step(step, normaliser=9.0)
    torch.testing.assert_close(resumed.values(batches)[0], critic.values(batches)[0], atol=1e-6, rtol=0)
