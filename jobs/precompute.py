"""Precomputed reference log-probs: one forward-only pass, then the reference is released.

    encoded train + held-out pairs (Ray Data) -> reference group .logprobs (ObjectRefs)
      -> {record id: per-pair log-probs}        kept by the driver (a few floats a pair)

Training then looks the values up instead of running the reference every step, so the
reference model's memory (a second copy of the weights on every GPU) is free for the
policy. The values do not depend on batch composition: the reference is frozen and
each row's log-probs come from its own tokens (padding is masked).
"""

from __future__ import annotations

import time

import torch

from jobs.common import split_shares
from vlrlhf.data.pipeline import collate_items, encoded_dataset, iter_encoded
from vlrlhf.training import PairLogps


def precompute_reference(group, data, adapter, batch_size: int, micro_batch_size: int) -> dict[str, PairLogps]:
    """{record id: PairLogps with one row} for every train and held-out pair."""
    started = time.perf_counter()
    pending = []
    for records in (data.train, data.held_out):
        dataset = encoded_dataset(records, data.settings, resources=data.resources) if records else None
        items = list(iter_encoded(dataset, data.bad)) if records else []
        for number, start in enumerate(range(0, len(items), batch_size)):  # a chunk per call, round robin
            (micro_items,) = split_shares(items[start:start + batch_size], 1, micro_batch_size)
            micro_batches = [collate_items(adapter, micro) for micro in micro_items]
            pending.append((micro_items, group.call(number % group.world_size, "logprobs", micro_batches)))
    table: dict[str, PairLogps] = {}
    for micro_items, ref in pending:
        for micro, logps in zip(micro_items, group.get([ref])[0], strict=True):
            for row, item in enumerate(micro):
                table[item.id] = row_of(logps, row)
    print(f"reference log-probs precomputed for {len(table)} pairs in {time.perf_counter() - started:.1f}s")
    return table


def row_of(logps: PairLogps, row: int) -> PairLogps:
    return PairLogps(*(None if value is None else value[row: row + 1].clone() for value in
                       (logps.chosen, logps.rejected, logps.chosen_lengths, logps.rejected_lengths, logps.corrupted)))


def lookup(table: dict[str, PairLogps], shares: list[list[list]]) -> list[list[PairLogps]]:
    """Per worker, per micro-batch: the stacked precomputed rows of its items."""
    def stack(rows: list[PairLogps]) -> PairLogps:
        fields = zip(*((r.chosen, r.rejected, r.chosen_lengths, r.rejected_lengths, r.corrupted) for r in rows),
                     strict=True)
        return PairLogps(*(None if values[0] is None else torch.cat(values) for values in fields))

    return [[stack([table[item.id] for item in micro]) for micro in share] for share in shares]
