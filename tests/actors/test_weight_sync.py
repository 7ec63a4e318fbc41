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
    sent = [p for n, p in names.items() if p.requires_grad and "vision_tower" not in n] if lora is None else \
        [names[f"{target}.weight"] for target in adapter.lora_targets(base)]
    assert stats["bytes"] == 4 * sum(p.numel() for p in sent)  # float32 here


def test_the_merged_state_travels_at_the_engines_width(tiny_path):
    """A bf16 base with fp32 LoRA adapters (the policy's layout) merges into bf16 tensors,
    W + scale * B A rounded once; fp32 master weights go at the engines' bf16 too; other
    ranks return nothing."""
    import torch
    from peft import LoraConfig, get_peft_model

    from actors.weight_sync import merged_state, state_bytes
    from vlrlhf.models.registry import load_adapter

    path = str(tiny_path("llava"))
    adapter = load_adapter(path)
    base = adapter.load_model().to(torch.bfloat16)
    targets = adapter.lora_targets(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    state = merged_state(model, 0, dtype=torch.bfloat16)
    assert state and {t.dtype for t in state.values()} == {torch.bfloat16}
    layer = next(m for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith(targets[0]))
    name = next(n for n, m in model.named_modules() if m is layer)
    plain = name.removeprefix("base_model.model.") + ".weight"
    expected = (layer.base_layer.weight.float() + layer.get_delta_weight("default")).to(torch.bfloat16)
    assert torch.equal(state[plain], expected)
    assert state_bytes(state) == sum(2 * t.numel() for t in state.values())
    assert merged_state(model, 1, dtype=torch.bfloat16) == {}
    full = adapter.load_model()  # fp32 master weights, engines in bf16
    assert {t.dtype for t in merged_state(full, 0, dtype=torch.bfloat16).values()} == {torch.bfloat16}
