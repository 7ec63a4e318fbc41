"""A text-only micro-batch on one rank while the other has images, under ZeRO-3 with two
workers: every rank runs the vision tower (a zero-weighted pass where a batch has no image),
so the ranks' parameter gathers stay in step, and the steps equal ddp's. For a family whose
tower runs inside the language model's forward (Qwen2-VL, M-RoPE) and one whose tower feeds
a projector before it (LLaVA)."""

from __future__ import annotations

import pytest
import ray

from actors.group import ActorGroup
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import shard
from tests.jobs.test_training_invariants import DATA, specs
from vlrlhf.config import GroupSpec
from vlrlhf.data.pipeline import EncodedItem, EncodeSettings, encode_record
from vlrlhf.data.reader import read_records
from vlrlhf.models.registry import load_adapter

STEP_TIMEOUT_S = 240  # a rank left waiting in a gather would hang here for good


def text_only(record):
    prompt = [m.model_copy(update={"content": m.content.replace("<image>", "").strip()}) for m in record.prompt]
    return record.model_copy(update={"images": [], "prompt": prompt})


def mixed_items(path):
    """8 pairs: the first 4 with images (rank 0's share), the last 4 text-only (rank 1's)."""
    adapter = load_adapter(path)
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA))
    records = read_records(str(DATA / "preference.json"), "plain_dpo")[:8]
    records = records[:4] + [text_only(r) for r in records[4:]]
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records)]
    assert [bool(r.images) for r in records] == [True] * 4 + [False] * 4
    return adapter, items


def train_step(group, adapter, items, reference) -> float:
    shards = shard(items, 2, 2, adapter)
    assert all("pixel_values" not in micro.chosen.extras for micro in shards[1])  # rank 1: no image at all
    refs = [reference.logprobs(s) for s in shards]
    results = ray.get(group.map("train_step", shards, refs, [8.0, 8.0]), timeout=STEP_TIMEOUT_S)
    return sum(s["loss_sum"] for r in results for s in r["sums"]) / 8


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_text_only_rank_under_zero3_trains_as_ddp(ray_cluster, tiny_path, family):
    path = tiny_path(family)
    adapter, items = mixed_items(path)
    model, algorithm, trainer, total = specs(path, freeze_vision=False)
    trainer = trainer.model_copy(update={"max_grad_norm": 1.0, "micro_batch_size": 2, "zero_stage": 3})
    reference = ReferenceWorker(model)
    losses = {}
    for strategy in ("ddp", "deepspeed"):
        group = ActorGroup(PolicyWorker, GroupSpec(num_workers=2, cpus=0.5), name=f"mixed-{family}-{strategy}",
                           args=(model, algorithm, trainer.model_copy(update={"strategy": strategy}), total))
        try:
            losses[strategy] = [train_step(group, adapter, items, reference) for _ in range(2)]
        finally:
            group.shutdown()
    assert losses["deepspeed"][0] == pytest.approx(losses["ddp"][0], abs=1e-6)
    assert losses["deepspeed"][1] == pytest.approx(losses["ddp"][1], abs=1e-5)  # the same update
    assert losses["ddp"][1] != pytest.approx(losses["ddp"][0], abs=1e-6)  # it did update
