"""DeepSpeed ZeRO-2/3 gives the same training as the plain data-parallel (ddp) strategy."""

from __future__ import annotations

import pytest
import torch

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import shard
from tests.jobs.test_training_invariants import pairs, specs  # noqa: F401  (module fixture)
from vlrlhf.config import GroupSpec


def two_steps(group, adapter, items, reference) -> tuple[list[float], list[dict]]:
    losses = []
    for _ in range(2):
        shards = shard(items, 2, 2, adapter)  # 2 workers x 2 micro-batches of 2 pairs
        refs = [reference.logprobs(s) for s in shards]
        results = group.get(group.map("train_step", shards, refs, [8.0, 8.0]))
        losses.append(sum(s["loss_sum"] for r in results for s in r["sums"]) / 8)
    return losses, group.get(group.broadcast("trainable_state"))


@pytest.mark.parametrize("stage", [2, 3])
def test_ddp_and_deepspeed_zero_give_the_same_steps(ray_cluster, pairs, tmp_path, stage):  # noqa: F811
    path, adapter, items = pairs
    model, algorithm, trainer, total = specs(path)
    trainer = trainer.model_copy(update={"max_grad_norm": 1.0})
    reference = ReferenceWorker(model)
    results = {}
    for strategy in ("ddp", "deepspeed"):
        config = trainer.model_copy(update={"strategy": strategy, "zero_stage": stage})
        group = ActorGroup(PolicyWorker, GroupSpec(num_workers=2, cpus=0.5), name=f"policy-{strategy}",
                           args=(model, algorithm, config, total))
        try:
            results[strategy] = two_steps(group, adapter, items, reference)
            if strategy == "deepspeed":  # a checkpoint holds the full weights, loadable by from_pretrained
                group.get(group.broadcast("save", str(tmp_path / "ck"), {"epoch": 0, "position": 8}))
        finally:
            group.shutdown()
    (ddp_losses, ddp_states), (ds_losses, ds_states) = results["ddp"], results["deepspeed"]
    assert ds_losses[0] == pytest.approx(ddp_losses[0], abs=1e-6)  # the same first-step loss
    assert ds_losses[1] == pytest.approx(ddp_losses[1], abs=1e-5)  # and the same update
    if stage == 2:  # ZeRO-3 keeps only a partition of each weight on a rank
        for name, value in ddp_states[0].items():
            torch.testing.assert_close(ds_states[0][name], value, atol=1e-4, rtol=0)
    from transformers import AutoModelForImageTextToText

    saved = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "ck").named_parameters())
    for name, value in ddp_states[0].items():
        torch.testing.assert_close(saved[name].detach(), value, atol=1e-4, rtol=0)
