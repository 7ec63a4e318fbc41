"""Objectives with a statistic of the whole step's batch (KTO's reference point, BCO's running
mean, AOT's ranks) train the same whatever the micro-batch size and worker count, and BCO's
running mean survives a checkpoint. Runs the real policy/reference workers, like
test_training_invariants."""

from __future__ import annotations

import pathlib

import pytest
import torch

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import shard
from tests.jobs.test_training_invariants import loss_of, pairs, step  # noqa: F401  (module fixture)
from vlrlhf.config import AlgorithmSpec, GroupSpec, ModelSpec, TrainerSpec
from vlrlhf.data.pipeline import EncodeSettings, EncodedItem, encode_record
from vlrlhf.data.reader import read_records
from vlrlhf.models.registry import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "shapes"


@pytest.fixture(scope="module")
def kto_items(tiny_path):
    path = tiny_path("llava")
    adapter = load_adapter(path)
    settings = EncodeSettings(model_path=str(path), task="kto", image_root=str(DATA))
    records = read_records(str(DATA / "kto.jsonl"), "kto")[:33]
    # each example's mismatched twin: its prompt with the next record's completion (as the pipeline does)
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings, partner=records[i + 1].completion))
             for i, r in enumerate(records[:32])]
    # The first step trains on desirable examples only: it raises the probability of answers
    # like the mismatched ones, so the step under test has a KL estimate well above 0 (a
    # clamped 0 would hide a per-micro-batch reference point).
    warmup = [item for item in items if item.encoded.desirable][:8]
    return path, adapter, (warmup, items[:8])


def worker_specs(path, algorithm: AlgorithmSpec, lr: float = 1e-2):
    # a large learning rate moves the policy far enough in one step for the reference point and
    # the rewards to be well away from 0 at the second step
    return (ModelSpec(path=str(path)), algorithm,
            TrainerSpec(lr=lr, lr_schedule="constant", max_grad_norm=None, batch_size=8, seed=0), 10)


def two_steps(path, adapter, items, algorithm, micro):
    """A first step in one micro-batch, then the step under test in micro-batches of `micro`.
    `items`: the step's items, or (first step's, step under test's)."""
    first, items = items if isinstance(items, tuple) else (items, items)
    model, algorithm, trainer, total = worker_specs(path, algorithm)
    policy = PolicyWorker(model, algorithm, trainer, total)
    reference = ReferenceWorker(model)
    step(policy, adapter, first, 8, reference)
    result = step(policy, adapter, items, micro, reference)
    return result, policy


def kl_of(result):
    sums = result["sums"]
    return sum(s["kl_sum"] for s in sums) / sum(s["count"] for s in sums)


def assert_same_training(results, reference_loss, reference_state):
    for loss, state in results:
        assert loss == pytest.approx(reference_loss, abs=1e-6)
        for name, value in state.items():
            torch.testing.assert_close(value, reference_state[name], atol=1e-5, rtol=0)


def test_kto_batch_8_equals_micro_batches_of_2_and_1(kto_items):
    path, adapter, items = kto_items
    algorithm = AlgorithmSpec(name="kto", beta=0.5)
    runs = {micro: two_steps(path, adapter, items, algorithm, micro) for micro in (8, 2, 1)}
    whole, policy = runs[8]
    # The step's reference point is the clamped mean over all 8 mismatched pairs; it is
    # positive here, so a per-micro-batch (or per-worker) estimate would change the loss.
    assert kl_of(whole) > 1e-3
    for micro in (2, 1):
        assert kl_of(runs[micro][0]) == pytest.approx(kl_of(whole), abs=1e-6)
    assert_same_training([(loss_of(r), p.trainable_state()) for r, p in (runs[m] for m in (2, 1))],
                         loss_of(whole), policy.trainable_state())


@pytest.mark.parametrize("loss_type", ["bco_pair", "aot", "aot_unpaired"])
def test_batch_level_dpo_types_give_batch_8_equal_to_4x2_and_1x8(pairs, loss_type):  # noqa: F811
    path, adapter, items = pairs
    algorithm = AlgorithmSpec(name="dpo", beta=0.5, loss_type=loss_type)
    runs = {micro: two_steps(path, adapter, items, algorithm, micro) for micro in (8, 2, 1)}
    whole, policy = runs[8]
    if loss_type == "bco_pair":  # both steps' rewards are in the running mean: 2 steps x 8 pairs x 2
        assert policy.bco_baseline.count == 32 and abs(policy.bco_baseline.mean) > 1e-4
        for _, other in runs.values():
            assert other.bco_baseline.count == 32
            # fp32 log-probs of different micro-batch paddings agree to ~1e-6 (x beta in the rewards)
            assert other.bco_baseline.mean == pytest.approx(policy.bco_baseline.mean, abs=1e-6)
    assert_same_training([(loss_of(r), p.trainable_state()) for r, p in (runs[m] for m in (2, 1))],
                         loss_of(whole), policy.trainable_state())


def test_bco_running_mean_is_restored_from_a_checkpoint(pairs, tmp_path):  # noqa: F811
    path, adapter, items = pairs
    model, algorithm, trainer, total = worker_specs(path, AlgorithmSpec(name="dpo", beta=0.5, loss_type="bco_pair"))
    reference = ReferenceWorker(model)
    first = PolicyWorker(model, algorithm, trainer, total)
    step(first, adapter, items, 4, reference)
    first.save(str(tmp_path), {"epoch": 0, "position": 8})
    assert first.bco_baseline.count == 16
    uninterrupted = loss_of(step(first, adapter, items, 4, reference))
    resumed = PolicyWorker(model, algorithm, trainer, total)
    state = resumed.load_state(str(tmp_path))
    assert "bco_baseline" not in state and resumed.bco_baseline.count == 16
    assert loss_of(step(resumed, adapter, items, 4, reference)) == pytest.approx(uninterrupted, abs=1e-6)
    assert resumed.bco_baseline.count == first.bco_baseline.count == 32
    assert resumed.bco_baseline.mean == pytest.approx(first.bco_baseline.mean, abs=1e-7)


def test_evaluation_uses_the_running_mean_without_counting_the_batch(pairs):  # noqa: F811
    path, adapter, items = pairs
    model, algorithm, trainer, total = worker_specs(path, AlgorithmSpec(name="dpo", beta=0.5, loss_type="bco_pair"))
    reference = ReferenceWorker(model)
    policy = PolicyWorker(model, algorithm, trainer, total)
    step(policy, adapter, items, 8, reference)
    before = policy.bco_baseline.state_dict()
    shards = shard(items, 1, 4, adapter)
    results = [policy.evaluate(shards[0], reference.logprobs(shards[0]))]
    results.append(policy.evaluate(shard(items, 1, 8, adapter)[0], reference.logprobs(shard(items, 1, 8, adapter)[0])))
    assert policy.bco_baseline.state_dict() == before
    assert loss_of(results[0]) == pytest.approx(loss_of(results[1]), abs=1e-6)


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_two_workers_equal_one_worker_with_the_doubled_batch(ray_cluster, pairs, kto_items, objective):  # noqa: F811
    """KTO's reference point and the batch-level DPO types (BCO's mean, AOT's ranks) are
    gathered over the data-parallel workers before use."""
    path, adapter, items = kto_items if objective == "kto" else pairs
    algorithm = AlgorithmSpec(name="kto", beta=0.5) if objective == "kto" else AlgorithmSpec(
        name="dpo", beta=0.5, loss_type={"sigmoid": 0.5, "bco_pair": 0.5, "aot": 0.5, "aot_unpaired": 0.5})
    single_result, single = two_steps(path, adapter, items, algorithm, 2)
    model, algorithm, trainer, total = worker_specs(path, algorithm)
    reference = ReferenceWorker(model)
    group = ActorGroup(PolicyWorker, GroupSpec(num_workers=2, cpus=0.5), name=f"policy-{objective}",
                       args=(model, algorithm, trainer, total))
    try:
        first, items = items if isinstance(items, tuple) else (items, items)
        for batch, micro in ((first, 4), (items, 1)):  # the first step in one micro-batch per worker
            shards = shard(batch, 2, micro, adapter)
            refs = [reference.logprobs(s) for s in shards]
            results = group.get(group.map("train_step", shards, refs, [8.0, 8.0]))
        loss = sum(s["loss_sum"] for r in results for s in r["sums"]) / 8
        assert loss == pytest.approx(loss_of(single_result), abs=1e-6)
        if objective == "kto":
            merged = {"sums": [s for r in results for s in r["sums"]]}
            assert kl_of(merged) == pytest.approx(kl_of(single_result), abs=1e-6) and kl_of(merged) > 1e-3
        states = group.get(group.broadcast("trainable_state"))
        for state in states:  # Adam: summation-order noise in near-zero gradients grows to ~lr * 1e-2
            for name, value in state.items():
                torch.testing.assert_close(value, single.trainable_state()[name], atol=1e-3, rtol=0)
    finally:
        group.shutdown()


def test_demo_kto_runs_with_micro_batches_of_one_and_an_uneven_split(ray_cluster, tmp_path):
    """configs/demo_kto.yaml with trainer.batch_size=7 and micro_batch_size=2: micro-batches of
    2, 2, 2 and 1 (a micro-batch of 1 used to fail inside kto_loss)."""
    from jobs.run import run_job

    overrides = ["trainer.max_steps=1", "trainer.batch_size=7", "trainer.micro_batch_size=2", "data.eval=[]",
                 "resources.policy.num_workers=0", f"checkpoint.dir={tmp_path / 'ck'}", "trainer.eval_every=0"]
    assert run_job(str(ROOT / "configs" / "demo_kto.yaml"), overrides, run_dir=str(tmp_path / "run")) == 0


def test_deepspeed_zero3_takes_the_same_step_statistics(ray_cluster, pairs):  # noqa: F811
    """The no-grad pre-pass runs before the engine's micro-steps; with ZeRO-3 its forward
    gathers the partitioned weights like any other. (KTO's pre-pass is the same kind of
    no-grad forward; one objective keeps this slow test to one pair of engines.)"""
    objective, (path, adapter, items) = "dpo", pairs
    algorithm = AlgorithmSpec(name="dpo", beta=0.5, loss_type={"bco_pair": 0.5, "aot": 0.5})
    single_result, _ = two_steps(path, adapter, items, algorithm, 2)
    model, algorithm, trainer, total = worker_specs(path, algorithm)
    trainer = trainer.model_copy(update={"strategy": "deepspeed", "zero_stage": 3, "micro_batch_size": 2})
    reference = ReferenceWorker(model)
    group = ActorGroup(PolicyWorker, GroupSpec(num_workers=2, cpus=0.5), name=f"policy-zero3-{objective}",
                       args=(model, algorithm, trainer, total))
    try:
        first, items = items if isinstance(items, tuple) else (items, items)
        for batch in (first, items):
            shards = shard(batch, 2, 2, adapter)
            refs = [reference.logprobs(s) for s in shards]
            results = group.get(group.map("train_step", shards, refs, [8.0, 8.0]))
        loss = sum(s["loss_sum"] for r in results for s in r["sums"]) / 8
        assert loss == pytest.approx(loss_of(single_result), abs=1e-5)
    finally:
        group.shutdown()
