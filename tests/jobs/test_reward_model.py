"""Reward-model training (algorithm.name=reward): Bradley-Terry on the head's scores."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from actors.common import load_state_file
from actors.policy import PolicyWorker
from actors.reward import RewardModelWorker
from jobs.run import run_job
from tests.jobs.test_training_invariants import loss_of, pairs, specs, step  # noqa: F401  (module fixture)
from vlrlhf.models.value_head import HEAD_FILE

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_training_separates_chosen_from_rejected(pairs):  # noqa: F811
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path, lr=2e-3, name="reward")
    worker = PolicyWorker(model, algorithm, trainer, total)
    worker.setup_distributed("127.0.0.1", 0, 0, 1)
    head_before = worker.head.linear.weight.detach().clone()
    first = step(worker, adapter, items, 4)
    # step 0: a fresh head scores both rows near 0, and the loss is the mean of -log sigmoid(margin)
    margin = sum(s["reward_margin_sum"] for s in first["sums"]) / 8
    assert abs(margin) < 0.5 and abs(loss_of(first) - math.log(2)) < 0.3
    for _ in range(25):
        last = step(worker, adapter, items, 4)
    sums = last["sums"]
    assert sum(s["reward_accuracy_sum"] for s in sums) / 8 == 1.0  # every training pair ranked right
    assert loss_of(last) < 0.5 * loss_of(first)
    assert not torch.equal(worker.head.linear.weight, head_before)  # the head is trained with the backbone


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward_run_writes_a_reward_model_the_online_role_loads(ray_cluster, tmp_path, lora):
    """A full backbone (a plain HF folder) or, with model.lora (what fits a 7B reward model on
    one GPU), LoRA adapters the online role merges on load; the head beside either."""
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", "resources.policy.num_workers=0", f"checkpoint.dir={tmp_path / 'ck'}"]
    overrides += ["model.lora={r: 4, alpha: 8}"] if lora else []
    assert run_job(str(ROOT / "configs" / "demo_reward.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert any("eval/reward_accuracy" in r for r in rows)
    checkpoint = tmp_path / "ck" / "step-000002"
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (checkpoint / HEAD_FILE).is_file() and (checkpoint / weights).is_file()
    if not lora:
        from transformers import AutoModelForImageTextToText

        AutoModelForImageTextToText.from_pretrained(checkpoint)  # the backbone is a plain HF folder
    from tests.actors.rollout_check import request

    scores = RewardModelWorker(str(checkpoint)).score([dict(request("red"), completion="red")])
    assert len(scores) == 1 and math.isfinite(scores[0])
    assert load_state_file(checkpoint / "trainer_state.pt")["step"] == 2  # tensors and plain values only
