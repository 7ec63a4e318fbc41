"""The Ray Data pipeline: data files -> records -> a seeded epoch order -> encoded rows.

    read units (vlrlhf.data.sources)            ray.data.from_items(units): listings only
      -> map_batches(convert_units)             tasks read files, run the format converter,
                                                 drop the other split, pick KTO partners
      -> map_batches(add order key) -> sort     a seeded per-epoch permutation (all-to-all
                                                 in the cluster, spilled by Ray, never the driver)
      -> map_batches(encode_rows)               load images, run the adapter: payload rows
      [-> reference stage]                      jobs add reference log-prob columns
      -> block slices -> policy workers         vlrlhf.data.shares: workers fetch and collate

The order of epoch e is the sort by key = hash(seed, e, record id): a permutation that
does not depend on how files are split into blocks, so resume can skip what was trained
(`after_key`: the largest key consumed) without re-encoding it. The evaluation split is a
hash of each record id too: stable when files are reordered, never leaking into training.
Bad rows go through the job's ledger (vlrlhf.data.ledger): raised with file and row, or
counted once and quarantined. `encode_record` is the single-process encoder the tasks
call; tests use it as the oracle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
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
    ddpo_gamma: float | None = None  # DDPO: weight of corrected answer tokens (RLHF-V: 5)
    corrupt_keep: tuple[float, float] | None = None  # mDPO: area kept by the corrupting crop
    processor: tuple[tuple[str, object], ...] = ()  # model.processor options (image resolution)


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
    from vlrlhf.models.base import EncodeError  # models (torch) only where records are encoded

    expected = RECORD_FOR_TASK[settings.task]
    if not isinstance(record, expected):
        raise EncodeError("wrong_record_type", f"task {settings.task!r} takes {expected.__name__} records, "
                                               f"got {type(record).__name__}")
    images = [load_image(source, image_root=settings.image_root, max_pixels=settings.max_pixels)
              for source in record.images]
    kwargs = dict(max_length=settings.max_length, record=record.id)
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
    key = (settings.model_path, settings.adapter, repr(settings.processor))
    if key not in _ADAPTERS:
        from vlrlhf.models.base import LoadOptions
        from vlrlhf.models.registry import load_adapter

        _ADAPTERS[key] = load_adapter(settings.model_path, adapter=settings.adapter,
                                      options=LoadOptions(processor=settings.processor))
    return _ADAPTERS[key]


def in_eval_split(record_id: str, eval_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction


def ordered(records: list, seed: int | None, epoch: int = 0) -> list:
    """A small in-driver list (online prompts) in epoch `epoch`'s order: a permutation drawn
    from (seed, epoch); None keeps the list's order."""
    if seed is None:
        return list(records)
    permutation = np.random.default_rng([seed, epoch]).permutation(len(records))
    return [records[i] for i in permutation]


def order_key(record_id: str, seed: int, epoch: int) -> int:
    """The record's place in epoch `epoch`'s order: a 63-bit hash of (seed, epoch, id)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


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

    def rule_drops(self, unit: str, dropped: dict[str, int]) -> None:
        if self.ledger is not None and dropped:
            import ray

            ray.get(self.ledger.set_rule_drops.remote(unit, dropped))


def skip_or_raise(sink: BadRows | None, rows: list[tuple[str, str, str, str]]) -> None:
    (sink or BadRows()).handle(rows)


BLOCK_ROWS = 64  # records per block out of the read stage (and so per sorted block)


def convert_units(batch: dict, source: RecordSource):
    """Ray Data map: read each unit, convert its rows to records (ids 'file:row'), keep this split."""
    from vlrlhf.data.formats import FormatContext, get_converter
    from vlrlhf.data.reader import convert_rows
    from vlrlhf.data.sources import read_unit

    converter = get_converter(source.data_format)
    ids, blobs = [], []
    for blob in batch["unit"]:
        unit = pickle.loads(blob)
        context = FormatContext(options=dict(source.options))
        try:
            records, failed = convert_rows(list(read_unit(unit)), unit.path, unit.name, converter, context)
        except FileNotFoundError:
            raise ValueError(f"data file {unit.path} does not exist") from None
        bad = [(where, reason, message, "read") for where, reason, message in failed]
        skip_or_raise(source.sink, bad)
        if source.sink is not None:
            source.sink.rule_drops(f"{unit.path}#{unit.part}", dict(context.dropped))
        for position, record in enumerate(records):
            if source.eval_fraction and source.split != "all" and \
                    in_eval_split(record.id, source.eval_fraction, source.seed) != (source.split == "eval"):
                continue
            # KTO's mismatched twin: the next record of the same unit (cyclic); stable across epochs
            partner = getattr(records[(position + 1) % len(records)], "completion", None)
            ids.append(record.id)
            blobs.append(pickle.dumps((record, partner)))
            if len(ids) == BLOCK_ROWS:  # several blocks per file: the stages after the sort run in parallel
                yield {"id": np.array(ids, dtype=object), "record": np.array(blobs, dtype=object)}
                ids, blobs = [], []
    if ids:
        yield {"id": np.array(ids, dtype=object), "record": np.array(blobs, dtype=object)}


def record_dataset(source: RecordSource):
    """A Ray Data dataset of converted records (columns id, record), one read task per unit."""
    import ray

    # a BadRecordError raised in a task reaches the consumer as itself (file, row, reason)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    units = [{"unit": pickle.dumps(unit)} for unit in source.units]
    dataset = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 64)))
    return dataset.map_batches(convert_units, fn_kwargs={"source": source}, batch_size=1, batch_format="numpy")


def add_order_key(batch: dict, seed: int, epoch: int) -> dict:
    batch["key"] = np.array([order_key(str(i), seed, epoch) for i in batch["id"]], dtype=np.int64)
    return batch


def epoch_dataset(records, seed: int, epoch: int, after_key: int | None = None, rows: int | None = None):
    """`records` in epoch `epoch`'s seeded order, from the first key above `after_key`.
    `rows` (how many records there are) splits the sort into blocks of about BLOCK_ROWS:
    keys are uniform hashes, so even key ranges make even blocks, and the stages after
    the sort run in parallel and stream instead of waiting for one block of everything."""
    keyed = records.map_batches(add_order_key, fn_kwargs={"seed": seed, "epoch": epoch}, batch_format="numpy")
    if after_key is not None:
        keyed = keyed.filter(lambda row: row["key"] > after_key)
    parts = max(1, min((rows or 0) // BLOCK_ROWS, 1024))
    boundaries = [(2 ** 63 // parts) * index for index in range(1, parts)] or None
    return keyed.sort("key", boundaries=boundaries)


@dataclasses.dataclass(frozen=True)
class PipelineResources:
    """What the encode stage may take from the cluster: CPUs per task and tasks at once
    (None: as many as Ray Data likes). jobs.common.pipeline_budget derives them from the
    spec and what the actor groups leave free."""

    task_cpus: float = 1.0
    concurrency: int | None = None


def encode_rows(batch: dict, settings: EncodeSettings, sink: BadRows | None) -> dict:
    """Ray Data map: records -> pickled EncodedItems (id, key, payload, weight). Rows that fail
    go to the ledger (or raise) and are dropped here."""
    from vlrlhf.models.batch import EncodedExample

    adapter = cached_adapter(settings)
    keys = batch["key"] if "key" in batch else np.zeros(len(batch["id"]), dtype=np.int64)
    out = {"id": [], "key": [], "payload": [], "weight": []}
    bad = []
    for key, blob in zip(keys, batch["record"], strict=True):
        record, partner = pickle.loads(blob)
        try:
            encoded = encode_record(adapter, record, settings, partner)
        except ReasonError as error:  # ImageError, EncodeError: a bad record with its reason
            bad.append((record.id, error.reason, str(error), "encode"))
            continue
        out["id"].append(record.id)
        out["key"].append(int(key))
        out["payload"].append(pickle.dumps(EncodedItem(int(key), record.id, record, encoded)))
        out["weight"].append(float(encoded.num_label_tokens) if isinstance(encoded, EncodedExample) else 1.0)
    skip_or_raise(sink, bad)
    return {"id": np.array(out["id"], dtype=object), "key": np.array(out["key"], dtype=np.int64),
            "payload": np.array(out["payload"], dtype=object), "weight": np.array(out["weight"], dtype=np.float64)}


def encoded_dataset(records, settings: EncodeSettings, *, sink: BadRows | None = None, batch_size: int = 16,
                    resources: PipelineResources = PipelineResources()):
    """`records` (a dataset of id/record[/key] rows) encoded for `settings.task`, in order."""
    import ray

    if settings.task not in TASKS:
        raise ValueError(f"task={settings.task!r} is not one of {', '.join(TASKS)}")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.raise_original_map_exception = True
    return records.map_batches(encode_rows, fn_kwargs={"settings": settings, "sink": sink},
                               batch_size=batch_size, batch_format="numpy", concurrency=resources.concurrency,
                               num_cpus=resources.task_cpus)


def iter_items(dataset):
    """Every EncodedItem of an encoded dataset, in order (in-process consumers, tools, tests)."""
    for row in dataset.iter_rows():
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
