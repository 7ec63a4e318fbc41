"""The Ray Data pipeline: data files -> records -> a seeded order -> encoded rows.

    read units (vlrlhf.data.sources)        listings and Parquet footers, in the driver
      count pass (tasks)                    records per unit: numbers to the driver, bad
                                            rows raised or quarantined here first
      windows (vlrlhf.data.order)           the driver plans epochs e..E: units shuffled,
                                            grouped into windows, resume point dropped
      -> map_batches(WindowReader)          actors: read a window's units, convert, shuffle
                                            inside the window; one item per BLOCK_ROWS ranks
      -> map_batches(Encoder)               actors with the processor loaded once: load
                                            images, run the adapter: payload rows
      [-> reference stage]                  jobs add reference log-prob columns
      -> block slices -> policy workers     vlrlhf.data.shares: workers fetch and collate

No all-to-all exchange: a window's records sit in one reader, encoded blocks stream to
the trainers as they are made, and one execution covers every remaining epoch, so the
encoders stay warm across epoch boundaries. The order keys (vlrlhf.data.order) increase
along the run; resume drops what was trained (`after_key`) before anything is encoded.
The evaluation split is a hash of each record id: stable when files are reordered,
never leaking into training. Bad rows go through the job's ledger (vlrlhf.data.ledger):
raised with file and row, or counted once and quarantined. `encode_record` is the
single-process encoder the actors call; tests use it as the oracle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pickle
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from vlrlhf.data.images import DEFAULT_MAX_PIXELS, load_image
from vlrlhf.data.bad import BadRecordError
from vlrlhf.data.records import Conversation, KTOExample, PreferencePair, PromptRecord
from vlrlhf.errors import ReasonError

if TYPE_CHECKING:  # torch stays out of the read and sort tasks' processes
    from vlrlhf.models.batch import EncodedExample, ModelBatch

TASKS = ("sft", "preference", "kto", "prompt")
RECORD_FOR_TASK = {"sft": Conversation, "preference": PreferencePair, "kto": KTOExample, "prompt": PromptRecord}


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """What an encoding worker needs (picklable, no config objects)."""

    model_path: str
    task: str
    adapter: str | None = None
    max_length: int | None = None
    image_root: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_overflow: str = "resize"  # a record over max_length: resize | skip | raise (vlrlhf.data.fit)
    ddpo_gamma: float | None = None  # DDPO: weight of corrected answer tokens (RLHF-V: 5)
    corrupt_keep: tuple[float, float] | None = None  # mDPO: area kept by the corrupting crop
    processor: tuple[tuple[str, object], ...] = ()  # model.processor options (image resolution)
    trust_remote_code: bool = False  # model.trust_remote_code: the checkpoint's own processor code


@dataclasses.dataclass
class EncodedPair:
    """A preference pair: chosen and rejected share the prompt and its images."""

    chosen: EncodedExample
    rejected: EncodedExample
    corrupted: EncodedExample | None = None  # mDPO: the chosen answer given corrupted images


@dataclasses.dataclass
class PairBatch:
    """Collated pairs: chosen and rejected rows (and mDPO's corrupted-image rows)."""

    chosen: ModelBatch
    rejected: ModelBatch
    corrupted: ModelBatch | None = None


@dataclasses.dataclass
class KTOBatch:
    """Collated KTO examples, their mismatched twins and the (B,) desirable flags."""

    completions: ModelBatch
    mismatched: ModelBatch
    desirable: object  # (B,) bool tensor


@dataclasses.dataclass
class EncodedKTO:
    """A KTO example and its mismatched twin (this prompt, the next record's completion),
    whose log-probs estimate KTO's KL reference point."""

    completion: EncodedExample
    mismatched: EncodedExample
    desirable: bool


@dataclasses.dataclass
class EncodedItem:
    """One encoded record and where it came from."""

    key: int  # the record's order key in this epoch (vlrlhf.data.pipeline.order_key)
    id: str  # 'file:row'
    record: object  # the record (answers, metadata for rewards, spans for DDPO)
    encoded: EncodedExample | EncodedPair | EncodedKTO


def encode_record(adapter, record, settings: EncodeSettings, partner: str | None = None):
    """Load the record's images and encode it for its task. Raises ImageError / EncodeError.
    `partner`: for KTO, the completion of another record (the mismatched pair)."""
    return encode_fitted(adapter, record, settings, partner)[0]


def encode_fitted(adapter, record, settings: EncodeSettings, partner: str | None = None) -> tuple[object, float]:
    """(encoding, image scale): a record over max_length after image expansion is resized,
    skipped or raised as `settings.image_overflow` says (vlrlhf.data.fit), never cut."""
    from vlrlhf.data.fit import fit
    from vlrlhf.models.base import EncodeError  # models (torch) only where records are encoded

    expected = RECORD_FOR_TASK[settings.task]
    if not isinstance(record, expected):
        raise EncodeError("wrong_record_type", f"task {settings.task!r} takes {expected.__name__} records, "
                                               f"got {type(record).__name__}")
    images = [load_image(source, image_root=settings.image_root, max_pixels=settings.max_pixels)
              for source in record.images]
    encoded, _, scale = fit(lambda sized: encode_task(adapter, record, settings, partner, sized), images,
                            max_length=settings.max_length, overflow=settings.image_overflow,
                            placeholder_ids=adapter.placeholder_token_ids, record=record.id)
    return encoded, scale


def encode_task(adapter, record, settings: EncodeSettings, partner: str | None, images: list):
    """The record encoded for its task with these images, without a length check."""
    kwargs = dict(record=record.id)
    dump = [m.model_dump() for m in getattr(record, "messages", None) or record.prompt]
    if settings.task == "sft":
        return adapter.encode(dump, images, **kwargs)
    if settings.task == "preference":
        with adapter.images_once():  # chosen and rejected share the preprocessed images
            return encode_pair(adapter, record, dump, images, settings, kwargs)
    if settings.task == "kto":
        with adapter.images_once():
            return encode_kto(adapter, record, dump, images, partner, kwargs)
    return adapter.encode_prompt(dump, images, **kwargs)


def encode_kto(adapter, record, dump, images, partner, kwargs) -> EncodedKTO:
    """The completion and its mismatched twin (this prompt, another record's completion)."""
    completion = adapter.encode(dump + [{"role": "assistant", "content": record.completion}], images, **kwargs)
    mismatched = adapter.encode(dump + [{"role": "assistant", "content": partner or record.completion}], images,
                                **kwargs)
    return EncodedKTO(completion, mismatched, record.desirable)


def encode_pair(adapter, record, dump, images, settings: EncodeSettings, kwargs) -> EncodedPair:
    chosen_turn = dump + [{"role": "assistant", "content": record.chosen}]
    chosen = adapter.encode(chosen_turn, images, **kwargs)
    rejected = adapter.encode(dump + [{"role": "assistant", "content": record.rejected}], images, **kwargs)
    if settings.ddpo_gamma is not None:
        from vlrlhf.data.formats import correction_spans
        from vlrlhf.data.token_weights import span_weights

        chosen_spans = record.chosen_spans
        if chosen_spans is None:
            chosen_spans = correction_spans(record.chosen, record.rejected)
        gamma = settings.ddpo_gamma
        chosen.label_weights = span_weights(adapter.tokenizer, chosen, record.chosen, chosen_spans, gamma)
        rejected.label_weights = span_weights(adapter.tokenizer, rejected, record.rejected,
                                              correction_spans(record.rejected, record.chosen), gamma)
    corrupted = None
    if settings.corrupt_keep is not None:
        if not images:
            from vlrlhf.models.base import EncodeError

            raise EncodeError("no_image", f"{record.id}: mDPO needs an image to corrupt")
        from vlrlhf.data.corrupt import corrupt_image

        low, high = settings.corrupt_keep
        noisy = [corrupt_image(image, f"{record.id}#{i}", low, high) for i, image in enumerate(images)]
        corrupted = adapter.encode(chosen_turn, noisy, **kwargs)
        corrupted.label_weights = chosen.label_weights
    return EncodedPair(chosen, rejected, corrupted)


_ADAPTERS: dict = {}


def cached_adapter(settings: EncodeSettings):
    """One adapter per worker process and checkpoint: Ray reuses warm workers, so the
    processor is loaded once, not per batch."""
    key = (settings.model_path, settings.adapter, repr(settings.processor), settings.trust_remote_code)
    if key not in _ADAPTERS:
        from vlrlhf.models.base import LoadOptions
        from vlrlhf.models.registry import load_adapter

        _ADAPTERS[key] = load_adapter(settings.model_path, adapter=settings.adapter,
                                      options=LoadOptions(processor=settings.processor,
                                                          trust_remote_code=settings.trust_remote_code))
    return _ADAPTERS[key]


def in_eval_split(record_id: str, eval_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """What the read/convert tasks need (picklable): files, format, split and the ledger."""

    units: tuple  # vlrlhf.data.sources.ReadUnit
    data_format: str
    options: dict = dataclasses.field(default_factory=dict)
    split: str = "all"  # all | train | eval: with eval_fraction, keep one side of the id hash
    eval_fraction: float = 0.0
    seed: int = 0
    sink: BadRows | None = None  # None: raise on the first bad row


@dataclasses.dataclass(frozen=True)
class BadRows:
    """Where a task sends its bad rows: the job's ledger actor, under the job's policy."""

    policy: str = "raise"
    ledger: object = None  # vlrlhf.data.ledger.Ledger actor

    def handle(self, rows: list[tuple[str, str, str, str]]) -> None:
        """(where, reason, message, stage) rows: raise BadRecordError for the first (policy raise),
        else count and quarantine them in the ledger."""
        if not rows:
            return
        if self.policy == "raise" or self.ledger is None:
            raise BadRecordError(*rows[0][:3])
        import ray

        ray.get(self.ledger.report.remote(rows))

    def resized(self, rows: list[tuple[str, float]]) -> None:
        """(where, scale) of records whose images were shrunk to fit max_length (counted, not bad)."""
        if self.ledger is not None and rows:
            import ray

            ray.get(self.ledger.report_resized.remote(rows))

    def rule_drops(self, unit: str, dropped: dict[str, int]) -> None:
        if self.ledger is not None and dropped:
            import ray

            ray.get(self.ledger.set_rule_drops.remote(unit, dropped))


def skip_or_raise(sink: BadRows | None, rows: list[tuple[str, str, str, str]]) -> None:
    (sink or BadRows()).handle(rows)


BLOCK_ROWS = 64  # records per block out of the read stage
READ_CPUS = 0.25  # logical CPUs of a window reader: it parses files, the encoders do the heavy work


def unit_records(unit, source: RecordSource) -> list[tuple[object, str | None]]:
    """(record, KTO partner) of every record of one read unit in source.split; bad rows go to the
    sink (raised, or counted and quarantined). What the count pass and the window readers share,
    so both see the same records."""
    from vlrlhf.data.formats import FormatContext, get_converter
    from vlrlhf.data.reader import convert_rows
    from vlrlhf.data.sources import read_unit

    context = FormatContext(options=dict(source.options))
    try:
        records, failed = convert_rows(list(read_unit(unit)), unit.path, unit.name, get_converter(source.data_format),
                                       context)
    except FileNotFoundError:
        raise ValueError(f"data file {unit.path} does not exist") from None
    skip_or_raise(source.sink, [(where, reason, message, "read") for where, reason, message in failed])
    if source.sink is not None:
        source.sink.rule_drops(f"{unit.path}#{unit.part}", dict(context.dropped))
    kept = []
    for position, record in enumerate(records):
        if source.eval_fraction and source.split != "all" and \
                in_eval_split(record.id, source.eval_fraction, source.seed) != (source.split == "eval"):
            continue
        # KTO's mismatched twin: the next record of the same unit (cyclic); stable across epochs
        kept.append((record, getattr(records[(position + 1) % len(records)], "completion", None)))
    return kept


def count_units(source: RecordSource, indexes: list[int]) -> list[int]:
    """Records of the split in each of the units `indexes` (a Ray task: numbers to the driver)."""
    return [len(unit_records(source.units[i], source)) for i in indexes]


def count_records(source: RecordSource, tasks: int = 16) -> list[int]:
    """Records of each read unit of `source` (its split), read and converted in up to `tasks` Ray
    tasks: the first bad row raises here under `on_bad_record: raise`. The driver receives the
    counts only. Plain tasks, not Ray Data: a job's first Ray Data execution starts its
    bookkeeping actors, which the stream can do in the background instead."""
    import ray

    indexes = list(range(len(source.units)))
    groups = [indexes[i::tasks] for i in range(min(tasks, len(indexes)))]
    count = ray.remote(count_units).options(num_cpus=READ_CPUS, max_retries=0)
    counts = [0] * len(indexes)
    for group, found in zip(groups, ray.get([count.remote(source, group) for group in groups]), strict=True):
        for index, records in zip(group, found, strict=True):
            counts[index] = records
    return counts


# A lost reader or encoder fails the execution, and the job's recovery (trainer.max_failures)
# restarts from the last checkpoint: the blocks it made may be lost with its node anyway.
NO_RESTARTS = {"max_restarts": 0, "max_task_retries": 0}


class WindowReader:
    """Ray Data actor: (window, part) items -> one block each of the records (id, key, record,
    exact) whose ranks in the window's order fall in the part, without the ranks a resumed run
    already trained. Reads the window's units from its source, converts their rows and orders
    them (vlrlhf.data.order), and keeps the last window it read for the window's next parts;
    imports no torch.

    One item per block, not one per window: Ray Data gathers everything one task yields into
    one block (up to 128 MB), so a window read in one task would reach the encoders as one
    block, encoded by one actor and released only when all of it is done."""

    def __init__(self, sources: tuple[RecordSource, ...]):
        self.sources = sources
        self.window_id = None
        self.ordered = []

    def __call__(self, batch: dict):
        from vlrlhf.data.order import make_key

        for blob, first, end in zip(batch["window"], batch["first"], batch["end"], strict=True):
            window = pickle.loads(blob)
            ordered = self.read(window)
            first, end = max(int(first), window.after_rank + 1), len(ordered) if end < 0 else int(end)
            block = None
            if first < end:
                block = _record_block([ordered[rank][0].id for rank in range(first, end)],
                                      [make_key(window.epoch, window.index, rank) for rank in range(first, end)],
                                      [pickle.dumps(ordered[rank]) for rank in range(first, end)], window.exact)
            if end == len(ordered):  # the window's last part: its records are not needed again
                self.window_id, self.ordered, ordered = None, [], None
            if block is not None:
                yield block

    def read(self, window) -> list:
        """The window's (record, row) pairs in its order, read once per window."""
        from vlrlhf.data.order import window_order

        window_id = (window.source, window.epoch, window.index, window.units)
        if window_id != self.window_id:
            source = self.sources[window.source]
            records = [pair for unit in window.units for pair in unit_records(source.units[unit], source)]
            if window.rows >= 0 and len(records) != window.rows:
                names = ", ".join(sorted({source.units[u].path for u in window.units}))
                raise ValueError(f"{names}: {len(records)} records where the count pass found {window.rows}: "
                                 "the data changed while the job ran")
            self.ordered = [records[position] for position in window_order([r.id for r, _ in records], window)]
            self.window_id = window_id
        return self.ordered


def window_parts(window) -> list[tuple[int, int]]:
    """[first, end) rank ranges of BLOCK_ROWS records covering what is left of a window; one
    open range (end -1) when its size is unknown."""
    if window.rows < 0:
        return [(window.after_rank + 1, -1)]
    return [(first, min(first + BLOCK_ROWS, window.rows))
            for first in range(window.after_rank + 1, window.rows, BLOCK_ROWS)]


def _record_block(ids: list, keys: list, blobs: list, exact: bool) -> dict:
    return {"id": np.array(ids, dtype=object), "key": np.array(keys, dtype=np.int64),
            "record": np.array(blobs, dtype=object), "exact": np.full(len(ids), exact)}


@dataclasses.dataclass(frozen=True)
class PipelineResources:
    """What the pipeline's actor pools take from the cluster: window readers and encoders
    (jobs.common.pipeline_budget derives them from the spec and what the actor groups leave free).
    Both are actors, so the processor is loaded once per encoder and stays warm; tasks would
    land on fresh worker processes whenever Ray retires idle ones (it keeps about one per CPU
    and the actor groups already count against that)."""

    encoders: int = 1
    encoder_cpus: float = 1.0
    readers: int = 1
    reader_cpus: float = READ_CPUS
    memory_mb: int = 256  # object-store bytes the execution's blocks may hold (data.pipeline_memory_mb)


def record_dataset(sources, windows: list | None = None, resources: PipelineResources = PipelineResources()):
    """A Ray Data dataset of (id, key, record, exact) rows: `windows` (vlrlhf.data.order) of
    `sources` (a RecordSource or a tuple of them) in their order, or every unit of the first
    source in file order (key = position) when None. Nothing is read until it executes."""
    import ray

    from vlrlhf.data.order import Window

    sources = (sources,) if isinstance(sources, RecordSource) else tuple(sources)
    if windows is None:
        windows = [Window(0, index, (index,), -1) for index in range(len(sources[0].units))]
    configure_context(resources)
    items = [{"window": pickle.dumps(window), "first": first, "end": end}
             for window in windows for first, end in window_parts(window)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    with quiet_remote_args():
        return dataset.map_batches(WindowReader, fn_constructor_kwargs={"sources": sources}, batch_size=1,
                                   batch_format="numpy", num_cpus=resources.reader_cpus,
                                   compute=ray.data.ActorPoolStrategy(size=resources.readers), **NO_RESTARTS)


def configure_context(resources: PipelineResources) -> None:
    """The driver's Ray Data settings for the pipeline: order kept, a BadRecordError reaching the
    consumer as itself, and the object store bounded. Without the bound Ray Data lets the readers
    run ahead of the encoders by whatever the store holds (30% of RAM): at 5,000 RLAIF-V rows the
    whole data set's image bytes sat in it. With it, what waits between the stages is about
    `memory_mb` (Ray Data still runs one task of each stage when a block is larger)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.raise_original_map_exception = True
    context.execution_options.preserve_order = True
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=resources.memory_mb * 2**20)


@contextlib.contextmanager
def quiet_remote_args():
    """Ray 2.60 deprecates passing actor options (max_restarts) through map_batches' keyword
    arguments without offering another way yet; the options still apply."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RayDeprecationWarning, message=".*ray_remote_args")
        yield


def encode_rows(batch: dict, settings: EncodeSettings, sink: BadRows | None) -> dict:
    """Records -> pickled EncodedItems (id, key, payload, weight). Rows that fail go to the ledger
    (or raise) and are dropped here, except in exact windows (held-out rows), where they leave
    a row with an empty payload, so that the rows out equal the records in."""
    from vlrlhf.models.batch import EncodedExample

    adapter = cached_adapter(settings)
    rows = len(batch["id"])
    keys = batch["key"] if "key" in batch else np.zeros(rows, dtype=np.int64)
    exact = batch["exact"] if "exact" in batch else np.zeros(rows, dtype=bool)
    out = {"id": [], "key": [], "payload": [], "weight": []}
    bad, resized = [], []
    for key, blob, keep in zip(keys, batch["record"], exact, strict=True):
        record, partner = pickle.loads(blob)
        try:
            encoded, scale = encode_fitted(adapter, record, settings, partner)
        except ReasonError as error:  # ImageError, EncodeError: a bad record with its reason
            bad.append((record.id, error.reason, str(error), "encode"))
            if keep:
                out["id"].append(record.id)
                out["key"].append(int(key))
                out["payload"].append(b"")
                out["weight"].append(0.0)
            continue
        if scale != 1.0:
            resized.append((record.id, scale))
        out["id"].append(record.id)
        out["key"].append(int(key))
        out["payload"].append(pickle.dumps(EncodedItem(int(key), record.id, record, encoded)))
        out["weight"].append(float(encoded.num_label_tokens) if isinstance(encoded, EncodedExample) else 1.0)
    skip_or_raise(sink, bad)
    if sink is not None:
        sink.resized(resized)
    return {"id": np.array(out["id"], dtype=object), "key": np.array(out["key"], dtype=np.int64),
            "payload": np.array(out["payload"], dtype=object), "weight": np.array(out["weight"], dtype=np.float64)}


class Encoder:
    """Ray Data actor: the adapter (processor and tokenizer) loaded once, then every batch it is given."""

    def __init__(self, settings: EncodeSettings, sink: BadRows | None):
        self.settings, self.sink = settings, sink
        cached_adapter(settings)

    def __call__(self, batch: dict) -> dict:
        return encode_rows(batch, self.settings, self.sink)


def encoded_dataset(records, settings: EncodeSettings, *, sink: BadRows | None = None, batch_size: int = 16,
                    resources: PipelineResources = PipelineResources()):
    """`records` (a dataset of id/record[/key] rows) encoded for `settings.task` by a pool of
    warm encoders, in order."""
    import ray

    if settings.task not in TASKS:
        raise ValueError(f"task={settings.task!r} is not one of {', '.join(TASKS)}")
    configure_context(resources)
    with quiet_remote_args():
        return records.map_batches(Encoder, fn_constructor_kwargs={"settings": settings, "sink": sink},
                                   batch_size=batch_size, batch_format="numpy", num_cpus=resources.encoder_cpus,
                                   compute=ray.data.ActorPoolStrategy(size=resources.encoders), **NO_RESTARTS)


def iter_items(dataset):
    """Every EncodedItem of an encoded dataset, in order (in-process consumers, tools, tests)."""
    for row in dataset.iter_rows():
        if row["payload"]:  # empty: a held-out record that failed to encode
            yield pickle.loads(row["payload"])


def iter_batches(items: Iterator[EncodedItem], adapter, batch_size: int,
                 padding_side: str = "right") -> Iterator[tuple[list[EncodedItem], object]]:
    """(items, collated) with `batch_size` items each (the last may be smaller). Pairs give
    (chosen batch, rejected batch)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    chunk: list[EncodedItem] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk, collate_items(adapter, chunk, padding_side)
            chunk = []
    if chunk:
        yield chunk, collate_items(adapter, chunk, padding_side)


def collate_items(adapter, items: list[EncodedItem], padding_side: str = "right"):
    """ModelBatch for conversations and prompts, PairBatch for pairs, KTOBatch for KTO. The
    two sides of a pair (or a KTO example) hold the same image tensors (`images_once`); their
    batches share one stacked copy."""
    first = items[0].encoded
    if isinstance(first, EncodedPair):
        corrupted = None
        if first.corrupted is not None:
            corrupted = adapter.collate([i.encoded.corrupted for i in items], padding_side)
        chosen = [i.encoded.chosen for i in items]
        rejected = [i.encoded.rejected for i in items]
        chosen_batch = adapter.collate(chosen, padding_side)
        return PairBatch(chosen_batch, share_images(adapter.collate(rejected, padding_side), chosen_batch,
                                                    rejected, chosen), corrupted)
    if isinstance(first, EncodedKTO):
        import torch

        completions = [i.encoded.completion for i in items]
        mismatched = [i.encoded.mismatched for i in items]
        completion_batch = adapter.collate(completions, padding_side)
        return KTOBatch(completion_batch, share_images(adapter.collate(mismatched, padding_side), completion_batch,
                                                       mismatched, completions),
                        torch.tensor([i.encoded.desirable for i in items]))
    return adapter.collate([i.encoded for i in items], padding_side)


def share_images(batch, twin, examples: list, twin_examples: list):
    """`batch` with each extra that every example shares (the same object) with its twin's
    example taken from the twin's batch: one copy of a pair's pixels in memory, not two."""
    for name in list(batch.extras):
        if name in twin.extras and all(
                example.extras.get(name) is not None and example.extras.get(name) is other.extras.get(name)
                for example, other in zip(examples, twin_examples, strict=True)):
            batch.extras[name] = twin.extras[name]
    return batch
