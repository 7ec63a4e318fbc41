"""The seeded windowed order (vlrlhf.data.order) and the row stream (vlrlhf.data.stream),
without Ray: keys, windows, resume points, lookahead."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from vlrlhf.data.order import (MAX_EPOCHS, Window, make_key, plan_epoch, plan_windows, split_key, unit_order,
                               window_order)
from vlrlhf.data.stream import BlockQueue, RowStream, rows_in


def test_keys_hold_epoch_window_and_rank_and_increase_along_the_run():
    keys = [make_key(e, w, r) for e in (0, 1, 1023) for w in (0, 5, (1 << 21) - 1) for r in (0, 7, (1 << 32) - 1)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(split_key(make_key(e, w, r)) == (e, w, r) for e, w, r in [(0, 0, 0), (3, 17, 12345), (1023, 9, 1)])
    assert max(keys) < 2 ** 63  # an int64 column


def test_an_epoch_groups_its_shuffled_units_into_windows_of_at_least_window_rows():
    counts = [5, 0, 3, 9, 2, 4, 1]
    windows = plan_epoch(counts, seed=7, epoch=2, window_rows=6)
    order = [int(i) for i in np.random.default_rng([7, 2]).permutation(len(counts))]  # numpy's seeded permutation
    assert [u for w in windows for u in w.units] == [u for u in order if counts[u]]  # every non-empty unit once
    assert all(w.rows == sum(counts[u] for u in w.units) for w in windows)
    assert all(w.rows >= 6 for w in windows[:-1]) and all(w.rows - counts[w.units[-1]] < 6 for w in windows)
    assert [w.index for w in windows] == list(range(len(windows))) and {w.epoch for w in windows} == {2}
    assert plan_epoch(counts, seed=7, epoch=3, window_rows=6) != windows  # another epoch, another unit order
    in_file_order = plan_epoch(counts, seed=None, epoch=0, window_rows=100)
    assert in_file_order == [Window(0, 0, (0, 2, 3, 4, 5, 6), 24)]
    assert unit_order(4, None, 9) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at most 1024 epochs"):
        plan_epoch(counts, 0, MAX_EPOCHS, 6)


def test_inside_a_window_records_follow_a_hash_of_seed_epoch_and_id():
    ids = [f"f.json:{i}" for i in range(1, 30)]
    window = Window(4, 0, (0,), len(ids), seed=11)
    digest = {i: hashlib.blake2b(f"11:4:{i}".encode(), digest_size=8).digest() for i in ids}
    assert [ids[p] for p in window_order(ids, window)] == sorted(ids, key=lambda i: digest[i])
    shuffled = ids[::-1]  # read in another order (other blocks, another file split): the same order
    assert [shuffled[p] for p in window_order(shuffled, window)] == [ids[p] for p in window_order(ids, window)]
    assert window_order(ids, Window(0, 0, (0,), len(ids))) == list(range(len(ids)))  # seed None: file order


def test_a_resume_point_drops_the_windows_before_it_and_the_ranks_up_to_it():
    counts = [4, 4, 4, 4]
    full = plan_windows(counts, 1, range(0, 3), window_rows=8)  # two windows of 8 records per epoch
    assert [(w.epoch, w.index) for w in full] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    after = make_key(1, 0, 5)  # the 6th record of epoch 1's first window was the last trained
    resumed = plan_windows(counts, 1, range(1, 3), 8, after_key=after)
    assert [(w.epoch, w.index, w.after_rank) for w in resumed] == [(1, 0, 5), (1, 1, -1), (2, 0, -1), (2, 1, -1)]
    finished = plan_windows(counts, 1, range(1, 3), 8, after_key=make_key(1, 0, 7))  # the window's last rank
    assert [(w.epoch, w.index, w.after_rank) for w in finished] == [(1, 1, -1), (2, 0, -1), (2, 1, -1)]
    # a step may cross into the next epoch: resuming in epoch 2 skips epoch 1 whole
    assert [(w.epoch, w.index) for w in plan_windows(counts, 1, range(1, 3), 8, make_key(2, 0, 0))] == \
        [(2, 0), (2, 1)]


def blocks(*sizes: int) -> list[tuple[str, int, int]]:
    return [(f"b{i}", 0, size) for i, size in enumerate(sizes)]


def test_row_stream_takes_runs_of_rows_across_blocks_and_drops_the_incomplete_tail():
    rows = RowStream(iter(blocks(5, 3, 6, 2)))  # 16 rows
    assert rows.take(4) == [("b0", 0, 4)]
    assert rows.take(4) == [("b0", 4, 5), ("b1", 0, 3)]
    assert [rows_in(s) for s in rows.steps(3)] == [3, 3]  # 8 rows left: two runs of 3, a tail of 2 dropped
    assert rows.take(3) == []
    every = list(itertools.chain.from_iterable(RowStream(iter(blocks(5, 3, 6, 2))).steps(1)))
    assert [(b, s) for b, s, _ in every] == [(f"b{i}", j) for i, n in enumerate((5, 3, 6, 2)) for j in range(n)]


def test_row_stream_looks_ahead_only_at_rows_that_are_already_there():
    queue = BlockQueue(limit=4)
    rows = RowStream(queue)
    queue.put(("a", 0, 3))
    assert rows.take(4, wait=False) is None  # 3 of 4 rows here: not ready, nothing consumed
    assert rows.take(2, wait=False) == [("a", 0, 2)]
    queue.put(("b", 0, 5))
    assert rows.take(6, wait=False) == [("a", 2, 3), ("b", 0, 5)]
    queue.finish(ValueError("the execution failed"))
    with pytest.raises(ValueError, match="execution failed"):  # the pipeline's error reaches the consumer
        rows.take(1)
    assert rows.waited() >= 0 and rows.waited() == 0  # taken: it starts again from zero
