"""Precomputed reference log-probs equal the live reference's, whatever the batching."""

from __future__ import annotations

import pathlib

import torch

from actors.group import ActorGroup
from actors.reference import ReferenceWorker
from jobs.common import JobData, shard, split_shares
from jobs.precompute import lookup, precompute_reference
from vlrlhf.config import GroupSpec, ModelSpec
from vlrlhf.data.pipeline import EncodedItem, EncodeSettings, encode_record
from vlrlhf.data.reader import BadRecords, read_records
from vlrlhf.models.registry import load_adapter

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "shapes"


def test_precomputed_rows_equal_live_reference_logprobs(ray_cluster, tiny_path):
    path = tiny_path("llava")
    adapter = load_adapter(path)
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA))
    records = read_records(str(DATA / "preference.json"), "plain_dpo")[:10]
    data = JobData(records[:7], records[7:], settings, BadRecords())
    group = ActorGroup(ReferenceWorker, GroupSpec(num_workers=0), name="reference", args=(ModelSpec(path=str(path)),))
    table = precompute_reference(group, data, adapter, batch_size=4, micro_batch_size=3)
    assert sorted(table) == sorted(r.id for r in records)  # train and held-out, the short tails too
    # live: a different order and micro-batch size (other padding lengths)
    items = [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records[::-1])]
    shards = shard(items, 2, 2, adapter)
    live = [group.local.logprobs(s) for s in shards]
    looked_up = lookup(table, split_shares(items, 2, 2))
    for live_share, table_share in zip(live, looked_up, strict=True):
        for a, b in zip(live_share, table_share, strict=True):
            assert torch.allclose(a.chosen, b.chosen, atol=1e-5) and torch.allclose(a.rejected, b.rejected, atol=1e-5)
            assert torch.equal(a.chosen_lengths, b.chosen_lengths) and b.corrupted is None
