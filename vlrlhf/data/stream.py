"""A Ray Data execution consumed as row slices by a driver that must never wait for it.

    stream = Stream(dataset)          the execution starts now, in the background
    rows = stream.rows                RowStream over (block ref, start, stop) slices
    held_out = rows.take(100)         the next 100 rows (waits for them)
    for slices in rows.steps(16):     runs of 16 rows until the rows run out
        upcoming = rows.take(16, wait=False)   the next run if it is already there, else None
    rows.waited()                     seconds spent waiting since the last call
    stream.close()                    the execution and its actor pools end

A thread pulls the execution's blocks (refs and row counts, never their contents) into a
bounded queue as Ray Data makes them, so the driver can see whether the next step's rows
are ready without blocking, and hand them to the workers one step ahead (they fetch and
collate them while the current step computes). The queue holds at most `limit` blocks
beyond what Ray Data's own backpressure holds, so memory stays bounded by the prefetch
window, not the data set.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

from vlrlhf.data.shares import block_rows

Slices = list[tuple[object, int, int]]


class BlockQueue:
    """Blocks from the puller thread to the consumer: bounded, closable, errors passed on."""

    def __init__(self, limit: int):
        self.blocks: collections.deque = collections.deque()
        self.condition = threading.Condition()
        self.limit, self.finished, self.closed, self.error = limit, False, False, None

    def put(self, block) -> bool:
        """False once the consumer closed the queue (the puller stops)."""
        with self.condition:
            while len(self.blocks) >= self.limit and not self.closed:
                self.condition.wait()
            if self.closed:
                return False
            self.blocks.append(block)
            self.condition.notify_all()
            return True

    def finish(self, error: BaseException | None = None) -> None:
        with self.condition:
            self.finished, self.error = True, error
            self.condition.notify_all()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()

    def get(self):
        """The next block, waiting for it; None at the end; the execution's error if it failed."""
        with self.condition:
            while not self.blocks and not self.finished:
                self.condition.wait()
            if self.blocks:
                block = self.blocks.popleft()
                self.condition.notify_all()
                return block
            if self.error is not None:
                raise self.error
            return None

    def ready_rows(self) -> int:
        """Rows already here (the consumer can take them without waiting)."""
        with self.condition:
            return sum(stop - start for _, start, stop in self.blocks)


class RowStream:
    """Rows in order as block slices: `take(n)` the next n rows (fewer at the end), `steps(size)`
    runs of `size` rows until the rows run out, `waited()` how long the consumer waited for
    blocks since it last asked (the time the trainers waited for the pipeline)."""

    def __init__(self, blocks: BlockQueue | Iterator):
        if not isinstance(blocks, BlockQueue):  # a plain iterator (tests, small tools): no lookahead
            queue = BlockQueue(limit=1 << 30)
            for block in blocks:
                queue.put(block)
            queue.finish()
            blocks = queue
        self.queue, self.pending, self.seconds = blocks, None, 0.0

    def _next(self):
        if self.pending is not None:
            block, self.pending = self.pending, None
            return block
        started = time.perf_counter()
        try:
            return self.queue.get()
        finally:
            self.seconds += time.perf_counter() - started

    def take(self, rows: int, wait: bool = True) -> Slices | None:
        """The next `rows` rows as slices. wait=False: None unless all of them are already here."""
        if not wait:
            here = (self.pending[2] - self.pending[1] if self.pending else 0) + self.queue.ready_rows()
            if here < rows:
                return None
        slices, count = [], 0
        while count < rows:
            block = self._next()
            if block is None:
                break
            ref, start, stop = block
            end = min(stop, start + rows - count)
            slices.append((ref, start, end))
            count += end - start
            if end < stop:
                self.pending = (ref, end, stop)
        return slices

    def steps(self, size: int) -> Iterator[Slices]:
        while True:
            slices = self.take(size)
            if rows_in(slices) < size:
                return  # the incomplete tail would change the batch size
            yield slices

    def waited(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def rows_in(slices: Slices | None) -> int:
    return sum(stop - start for _, start, stop in slices or [])


class Stream:
    """A dataset executing in the background from the moment it is opened (its actor pools start
    while the caller does other work: the policy group loads its model meanwhile). `rows` is
    its RowStream; `close()` shuts the execution down, its actor pools with it, also when the
    consumer stopped early (max_steps): an abandoned execution would keep its actors and their
    CPUs (or their place on the policy's bundles) for the job's lifetime."""

    def __init__(self, dataset, limit: int = 16):
        self.queue = BlockQueue(limit)
        self.rows = RowStream(self.queue)
        # Ray Data's own streaming iteration, without its first-block wait (_execute_to_iterator):
        # the execution starts here and the thread below takes its blocks as they come
        self.executor = dataset._create_executor()
        bundles = dataset._build_bundle_iterator(self.executor)
        self.thread = threading.Thread(target=self._pull, args=(bundles,), name="vlrlhf-stream", daemon=True)
        self.thread.start()

    def _pull(self, bundles) -> None:
        try:
            for block in block_rows(bundles):
                if not self.queue.put(block):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            self.queue.finish(error)
        else:
            self.queue.finish()

    def close(self) -> None:
        self.queue.close()
        self.executor.shutdown(force=True)
        self.thread.join(timeout=30)
