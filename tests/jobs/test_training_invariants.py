"""Training invariants on the real policy/reference workers (in-process and on Ray)."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import normaliser_for, shard
from vlrlhf.config import AlgorithmSpec, GroupSpec, LoraSpec, ModelSpec, TrainerSpec
from vlrlhf.data.pipeline import EncodeSettings, EncodedItem, encode_record
from vlrlhf.data.reader import read_records
from vlrlhf.models.registry import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "shapes"


@pytest.fixture(scope="module")
def pairs(tiny_path):
    path = tiny_path("llava")
    adapter = load_adapter(path)
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA))
    records = read_records(str(DATA / "preference.json"), "plain_dpo")[:8]
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records)]
    return path, adapter, items


def specs(path, lr=1e-3, lora=None, freeze_vision=True, name="dpo"):
    return (ModelSpec(path=str(path), lora=lora, freeze_vision=freeze_vision), AlgorithmSpec(name=name, beta=0.1),
            TrainerSpec(lr=lr, lr_schedule="constant", max_grad_norm=None, batch_size=8, seed=0), 10)


def step(worker, adapter, items, micro, reference=None, world=1):
    shards = shard(items, world, micro, adapter)
    refs = reference.logprobs(shards[0]) if reference is not None else None
    spec = type("S", (), {"algorithm": worker.algorithm})
    return worker.train_step(shards[0], refs, normaliser_for(spec, items))


def loss_of(result):
    sums = result["sums"]
    return sum(s["loss_sum"] for s in sums) / sum(s["count"] for s in sums)


def test_dpo_loss_at_step_zero_is_log_2_with_an_identical_reference(pairs):
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path)
    policy = PolicyWorker(model, algorithm, trainer, total)
    reference = ReferenceWorker(model)
    result = step(policy, adapter, items, 4, reference)
    assert loss_of(result) == pytest.approx(math.log(2), abs=1e-6)


def test_every_trainable_parameter_moves_and_frozen_ones_do_not(pairs):
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path, name="sft")
    policy = PolicyWorker(model, algorithm, trainer, total)
    sft_items = [EncodedItem(i.key, i.id, i.record, i.encoded.chosen) for i in items]
    before, frozen = policy.trainable_state(), policy.frozen_state()
    assert frozen and all("vision_tower" in name for name in frozen)
    step(policy, adapter, sft_items, 8)
    after, frozen_after = policy.trainable_state(), policy.frozen_state()
    assert not [n for n in before if torch.equal(before[n], after[n])], "trainable parameters that did not move"
    assert all(torch.equal(frozen[n], frozen_after[n]) for n in frozen)


def test_lora_moves_adapters_only(pairs):
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path, lora=LoraSpec(r=4, alpha=8))
    policy = PolicyWorker(model, algorithm, trainer, total)
    reference = ReferenceWorker(model)
    before, frozen = policy.trainable_state(), policy.frozen_state()
    assert all("lora_" in n for n in before)
    step(policy, adapter, items, 8, reference)
    after = policy.trainable_state()
    # B starts at zero, so only B (and not A, whose gradient is B^T ...) moves on the first step
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert all(torch.equal(frozen[n], t) for n, t in policy.frozen_state().items())


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_batch_8_accum_1_equals_batch_4_accum_2(pairs, name):
    path, adapter, items = pairs
    if name == "sft":
        items = [EncodedItem(i.key, i.id, i.record, i.encoded.chosen) for i in items]
    results = []
    for micro in (8, 4, 2):
        model, algorithm, trainer, total = specs(path, name=name)
        policy = PolicyWorker(model, algorithm, trainer, total)
        reference = ReferenceWorker(model) if name == "dpo" else None
        # move the policy off the reference first, so the DPO loss is not the trivial log 2
        step(policy, adapter, items, 8, reference)
        loss = loss_of(step(policy, adapter, items, micro, reference))
        results.append((loss, policy.trainable_state()))
    for loss, state in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-6)
        for n, value in state.items():
            torch.testing.assert_close(value, results[0][1][n], atol=1e-5, rtol=0)


def test_two_data_parallel_workers_equal_one_worker_with_the_doubled_batch(ray_cluster, pairs):
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path)
    reference = ReferenceWorker(model)
    single = PolicyWorker(model, algorithm, trainer, total)
    step(single, adapter, items, 8, reference)
    single_second = loss_of(step(single, adapter, items, 8, reference))
    group = ActorGroup(PolicyWorker, GroupSpec(num_workers=2, cpus=0.5), name="policy-test",
                       args=(model, algorithm, trainer, total))
    try:
        for _ in range(2):
            shards = shard(items, 2, 2, adapter)
            refs = [reference.logprobs(s) for s in shards]
            results = group.get(group.map("train_step", shards, refs, [8.0, 8.0]))
        loss = sum(s["loss_sum"] for r in results for s in r["sums"]) / 8
        assert loss == pytest.approx(single_second, abs=1e-6)
        states = group.get(group.broadcast("trainable_state"))
        expected = single.trainable_state()
        # Both replicas equal the single worker. Adam divides each element by its own gradient
        # magnitude, so summation-order differences in near-zero gradients grow to ~lr * 1e-2.
        for state in states:
            for n, value in state.items():
                torch.testing.assert_close(value, expected[n], atol=1e-4, rtol=0)
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # replicas stay identical
    finally:
        group.shutdown()
