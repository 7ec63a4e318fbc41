"""The seeded training order: shuffled read units, grouped into windows, shuffled inside.

    counts = [records of each read unit]               (the pipeline's count pass: numbers only)
    windows = plan_windows(counts, seed, epochs=range(0, 3), window_rows=1024)
      epoch e:   units in a permutation drawn from (seed, e)
                 -> consecutive units grouped into windows of >= window_rows records
                 -> inside a window, records sorted by hash(seed, e, record id)

This is the shard shuffle plus block shuffle of MosaicML Streaming (py1b) and
WebDataset: no all-to-all exchange, one window's records in one read task at a time,
and an order that depends only on the data, the seed and `window_rows` (not on the
number of encoders, workers or blocks). Every record gets a 63-bit order key,

    key = epoch << 53 | window << 32 | rank            (rank: place inside its window)

that increases along the whole run, epoch after epoch. A checkpoint stores the largest
key trained; resume drops the windows below it and, in its window, the ranks up to it,
before anything is encoded, so the resumed run sees exactly what the uninterrupted one
would have.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

EPOCH_BITS, WINDOW_BITS, RANK_BITS = 10, 21, 32
MAX_EPOCHS, MAX_WINDOWS = 1 << EPOCH_BITS, 1 << WINDOW_BITS


@dataclasses.dataclass(frozen=True)
class Window:
    """Consecutive read units of one epoch whose records are shuffled together."""

    epoch: int
    index: int  # the window's place in its epoch
    units: tuple[int, ...]  # indexes into the source's read units, in the epoch's unit order
    rows: int  # records in the window (from the count pass)
    after_rank: int = -1  # resume: ranks up to this one were trained already
    seed: int | None = None  # None: file order (held-out sets, evaluation)
    source: int = 0  # which of the reader's sources (a job's train records, its held-out records)
    exact: bool = False  # one row out per record: a record that fails to encode leaves an empty row

    @property
    def first_key(self) -> int:
        return make_key(self.epoch, self.index, 0)


def make_key(epoch: int, window: int, rank: int) -> int:
    return (epoch << (WINDOW_BITS + RANK_BITS)) | (window << RANK_BITS) | rank


def split_key(key: int) -> tuple[int, int, int]:
    """(epoch, window, rank) of an order key."""
    return key >> (WINDOW_BITS + RANK_BITS), (key >> RANK_BITS) & (MAX_WINDOWS - 1), key & ((1 << RANK_BITS) - 1)


def record_hash(record_id: str, seed: int, epoch: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{epoch}:{record_id}".encode(), digest_size=8).digest()


def window_order(ids: list[str], window: Window) -> list[int]:
    """Positions of `ids` (the window's records in read order) in the window's order."""
    if window.seed is None:
        return list(range(len(ids)))
    return sorted(range(len(ids)), key=lambda i: (record_hash(ids[i], window.seed, window.epoch), ids[i]))


def unit_order(units: int, seed: int | None, epoch: int) -> list[int]:
    if seed is None:
        return list(range(units))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(units)]


def plan_epoch(counts: list[int], seed: int | None, epoch: int, window_rows: int) -> list[Window]:
    """Epoch `epoch`'s windows: its units (seeded order; None: file order) grouped so that
    each window holds at least `window_rows` records (the last may hold fewer)."""
    if not 0 <= epoch < MAX_EPOCHS:
        raise ValueError(f"epoch {epoch}: the order keys hold at most {MAX_EPOCHS} epochs")
    windows, units, rows = [], [], 0
    for unit in unit_order(len(counts), seed, epoch):
        if counts[unit] == 0:
            continue
        units.append(unit)
        rows += counts[unit]
        if rows >= window_rows:
            windows.append(Window(epoch, len(windows), tuple(units), rows, seed=seed))
            units, rows = [], 0
    if units:
        windows.append(Window(epoch, len(windows), tuple(units), rows, seed=seed))
    if len(windows) > MAX_WINDOWS:
        raise ValueError(f"{len(windows)} windows in an epoch, more than {MAX_WINDOWS}: raise data.shuffle_window")
    return windows


def plan_windows(counts: list[int], seed: int | None, epochs: range, window_rows: int,
                 after_key: int | None = None) -> list[Window]:
    """The windows of `epochs`, in order, without what the run trained up to `after_key`."""
    planned = [window for epoch in epochs for window in plan_epoch(counts, seed, epoch, window_rows)]
    if after_key is None:
        return planned
    epoch, index, rank = split_key(after_key)
    kept = []
    for window in planned:
        if (window.epoch, window.index) < (epoch, index):
            continue
        if (window.epoch, window.index) == (epoch, index):
            if rank + 1 >= window.rows:
                continue
            window = dataclasses.replace(window, after_rank=rank)
        kept.append(window)
    return kept
