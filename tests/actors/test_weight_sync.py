"""Weight sync: after a policy update the rollout engine answers as the saved policy does."""

from __future__ import annotations

import pytest

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from actors.rollout import RolloutWorker, Sampling, TransformersEngine
from actors.weight_sync import sync_weights
from jobs.common import shard
from tests.actors.rollout_check import request
from tests.jobs.test_training_invariants import pairs, specs  # noqa: F401  (module fixture)
from vlrlhf.config import GroupSpec, LoraSpec

GREEDY = Sampling(n=1, temperature=0.0, max_tokens=6)


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)], ids=["full", "lora"])
def test_rollout_follows_the_policy_after_sync(ray_cluster, pairs, tmp_path, lora):  # noqa: F811
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path, lr=5e-2, lora=lora)
    on_ray = lora is not None  # LoRA through Ray actors and the object store; full fine-tuning in-process
    workers = GroupSpec(num_workers=1, cpus=0.5) if on_ray else GroupSpec(num_workers=0)
    policy = ActorGroup(PolicyWorker, workers, name="policy-sync", args=(model, algorithm, trainer, total))
    rollout = ActorGroup(RolloutWorker, workers, name="rollout-sync", args=("transformers", str(path)))
    try:
        requests = [request("red"), request("blue")]
        before = rollout.get(rollout.broadcast("generate", requests, GREEDY))[0]
        shards = shard(items, 1, 8, adapter)
        asleep = rollout.get(rollout.broadcast("sleep"))  # as a colocated engine while the policy trains
        policy.get(policy.map("train_step", shards, [ReferenceWorker(model).logprobs(shards[0])], [8.0]))
        rollout.get(rollout.broadcast("wake_up"))
        assert asleep == [{"freed_bytes": 0}]  # on CPU there is no accelerator memory to give back
        # on Ray the tensors go by gloo broadcast from the policy's rank 0; in-process through the object store
        stats = sync_weights(policy, rollout, "collective" if on_ray else "object_store")
        after = rollout.get(rollout.broadcast("generate", requests, GREEDY))[0]
        policy.get(policy.broadcast("save", str(tmp_path / "ck"), {"epoch": 0, "position": 8}))
        if on_ray:  # a second update, through the object store this time, and a second collective one
            for method in ("object_store", "collective"):
                policy.get(policy.map("train_step", shards, [ReferenceWorker(model).logprobs(shards[0])], [8.0]))
                sync_weights(policy, rollout, method)
                again = rollout.get(rollout.broadcast("generate", requests, GREEDY))[0]
                policy.get(policy.broadcast("save", str(tmp_path / method), {"epoch": 0, "position": 8}))
                oracle = TransformersEngine(str(tmp_path / method)).generate(requests, GREEDY)
                assert [s.token_ids for s in again] == [s.token_ids for s in oracle]
                assert max(abs(a - b) for x, y in zip(again, oracle, strict=True)
                           for a, b in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4
    finally:
        policy.shutdown()
        rollout.shutdown()
    # the saved checkpoint (LoRA: adapter folder merged on load) is the independent oracle
    oracle = TransformersEngine(str(tmp_path / "ck")).generate(requests, GREEDY)
    assert [s.token_ids for s in after] == [s.token_ids for s in oracle]
    gaps = [abs(a - b) for x, y in zip(after, oracle, strict=True) for a, b in zip(x.logprobs, y.logprobs,
                                                                                    strict=True)]
    assert max(gaps) < 1e-4
    assert any(x.logprobs != y.logprobs for x, y in zip(before, after, strict=True))  # the update mattered
    base = TransformersEngine(str(path)).model
    names = dict(base.named_parameters())
    if lora is None:  # only changed tensors travel: the frozen vision tower stays home
        assert stats["tensors"] == sum(p.requires_grad for n, p in names.items() if "vision_tower" not in n)
    else:  # LoRA: the merged weights of the adapted layers only
        assert stats["tensors"] == len(adapter.lora_targets(base))
    assert stats["sync_s"] >= stats["load_s"] >= 0
