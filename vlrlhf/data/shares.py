"""Handing pipeline rows to the policy workers without the driver touching them.

The driver walks the final dataset's blocks as ObjectRefs with their row counts
(vlrlhf.data.stream) and gives each worker a `Share`: slices (block ref, start, stop) of
consecutive rows. Worker w of W gets rows [w B/W, (w+1) B/W) of the step's B rows, so a
step's global batch is exactly the next B rows of the epoch order, whatever the number
of workers: data parallelism, resume and the invariant tests rest on that. The worker
fetches its blocks from the object store (`load_share`), unpickles the encoded items and
collates them with its own adapter (`Prefetcher`: the next step's share in the background
while the current one computes). The driver sees refs and counts, never a tensor.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator


@dataclasses.dataclass
class Share:
    """One worker's rows of a step: block slices, plus how to get reference log-probs."""

    slices: list  # [(ObjectRef of an Arrow block, start, stop)]
    micro_batch_size: int
    reference: str | None = None  # None | "column" (a pipeline stage added it) | "local" | "policy"
    precomputed: str | None = None  # a Parquet folder of (id, reference) rows
    reference_path: str | None = None  # "local": the reference checkpoint (None: the policy's start)

    @property
    def rows(self) -> int:
        return sum(stop - start for _, start, stop in self.slices)


def block_rows(bundles) -> Iterator[tuple[object, int, int]]:
    """(block ref, start, stop) of every block of a dataset's RefBundles, in order."""
    for bundle in bundles:
        for entry, piece in zip(bundle.blocks, bundle.slices, strict=True):
            start, stop = (0, entry.metadata.num_rows) if piece is None else (piece.start_offset, piece.end_offset)
            if stop > start:
                yield entry.ref, start, stop


def step_slices(blocks: Iterator[tuple[object, int, int]], size: int, *,
                keep_tail: bool = False) -> Iterator[list[tuple[object, int, int]]]:
    """Consecutive runs of `size` rows as block slices. The incomplete tail is dropped
    (it would change the batch size) unless `keep_tail`."""
    current, count = [], 0
    for ref, start, stop in blocks:
        while start < stop:
            take = min(stop - start, size - count)
            current.append((ref, start, start + take))
            count += take
            start += take
            if count == size:
                yield current
                current, count = [], 0
    if keep_tail and count:
        yield current


def split_slices(slices: list[tuple[object, int, int]], parts: int) -> list[list[tuple[object, int, int]]]:
    """`parts` contiguous pieces with rows // parts rows each (the remainder is dropped)."""
    total = sum(stop - start for _, start, stop in slices)
    per_part = total // parts
    pieces = list(step_slices(iter(slices), per_part)) if per_part else []
    return pieces[:parts]


def load_rows(slices: list[tuple[object, int, int]], columns: tuple[str, ...]) -> list[dict]:
    """The rows of `slices` (fetched from the object store), with only `columns`."""
    import ray

    tables = ray.get([ref for ref, _, _ in slices])
    rows = []
    for table, (_, start, stop) in zip(tables, slices, strict=True):
        piece = table.slice(start, stop - start).select([c for c in columns if c in table.column_names])
        rows.extend(piece.to_pylist())
    return rows


_PRECOMPUTED: dict[str, dict] = {}


def precomputed_table(folder: str) -> dict[str, list[float]]:
    """id -> reference values of a precomputed Parquet folder (loaded once per process). The
    `reference` column must be a list of floats: a table whose column holds anything else (a
    pickle, as an earlier version wrote) is refused, never unpickled."""
    if folder not in _PRECOMPUTED:
        import pyarrow as pa
        import pyarrow.dataset as ds

        table = ds.dataset(folder, format="parquet").to_table(columns=["id", "reference"])
        kind = table.schema.field("reference").type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_floating(kind.value_type):
            raise ValueError(f"{folder}: the precomputed reference table's `reference` column is {kind}, not a "
                             "list of floats: refused (an earlier vlrlhf wrote pickles there; loading them could "
                             "run code). Delete the folder and the next run recomputes it")
        _PRECOMPUTED[folder] = {row["id"]: row["reference"] for row in table.to_pylist()}
    return _PRECOMPUTED[folder]


def load_share(share: Share) -> tuple[list, list | None, float, int]:
    """(encoded items, per-item reference values or None, label-token weight sum, largest key)."""
    rows = [row for row in load_rows(share.slices, ("payload", "reference", "weight", "key"))
            if row["payload"]]  # empty: a held-out record that failed to encode (counted in the ledger)
    items = [pickle.loads(row["payload"]) for row in rows]  # made by this job's own encoders
    references = None
    if share.reference == "column":
        references = [list(row["reference"]) for row in rows]
    elif share.precomputed is not None:
        table = precomputed_table(share.precomputed)
        references = [table[item.id] for item in items]
    weight = float(sum(row["weight"] for row in rows))
    last_key = max((int(row["key"]) for row in rows), default=-1)
    return items, references, weight, last_key


@dataclasses.dataclass
class LoadedShare:
    """A worker's share fetched, unpickled and collated."""

    micro_batches: list  # collated, micro_batch_size items each
    chunks: list  # the EncodedItems of each micro-batch
    values: list | None  # reference values (pipeline column or precomputed table), else None
    weight: float  # label tokens (or rows) of the share: token-mean SFT's normaliser
    last_key: int  # the largest order key (the driver's resume point)


def share_key(share: Share) -> tuple:
    return tuple((ref.hex(), start, stop) for ref, start, stop in share.slices)


def load_collated(share: Share, adapter) -> LoadedShare:
    from vlrlhf.data.pipeline import collate_items

    items, values, weight, last_key = load_share(share)
    size = share.micro_batch_size
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    return LoadedShare([collate_items(adapter, chunk) for chunk in chunks], chunks, values, weight, last_key)


class Prefetcher:
    """A worker's next share, fetched and collated in a background thread while the current
    step computes (the driver names it one step ahead when the pipeline already made it)."""

    def __init__(self):
        self.pool, self.pending = None, None

    def start(self, share: Share | None, adapter) -> None:
        if share is None:
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="vlrlhf-prefetch")
        self.pending = (share_key(share), self.pool.submit(load_collated, share, adapter))

    def load(self, share: Share, adapter) -> LoadedShare:
        """The share, from the prefetch when it is the one prefetched."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == share_key(share):
            return pending[1].result()
        return load_collated(share, adapter)
