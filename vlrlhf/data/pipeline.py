"""The Ray Data pipeline: records -> images loaded and validated -> encoded per model.

    records (driver: read, split, ordered by seed)  ->  ray.data.from_items
      -> map_batches(encode_batch)  workers load images and run the model's adapter
      -> iter_encoded           the consumer applies the bad-record policy, in order
      -> collated batches       adapter.collate

Order is deterministic for a seed (preserve_order; the permutation is drawn in the
driver), and `start` resumes at a position of that order, so a restarted job sees
exactly the examples an uninterrupted one would. The evaluation split is decided by
a hash of each record's id, so it never moves into training when files are
reordered or a run resumes. `encode_record` is the single-process encoder the
workers call; tests use it as the oracle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from collections.abc import Iterator

import numpy as np

from vlrlhf.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from vlrlhf.data.reader import BadRecords
from vlrlhf.data.records import Conversation, KTOExample, PreferencePair, PromptRecord
from vlrlhf.models.base import EncodeError
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

    position: int  # place in this run's order (resume offsets count these)
    id: str  # 'file:row'
    record: object  # the record (answers, metadata for rewards, spans for DDPO)
    encoded: EncodedExample | EncodedPair | EncodedKTO


def encode_record(adapter, record, settings: EncodeSettings, partner: str | None = None):
    """Load the record's images and encode it for its task. Raises ImageError / EncodeError.
    `partner`: for KTO, the completion of another record (the mismatched pair)."""
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
        return encode_pair(adapter, record, dump, images, settings, kwargs)
    if settings.task == "kto":
        completion = adapter.encode(dump + [{"role": "assistant", "content": record.completion}], images, **kwargs)
        mismatched = adapter.encode(dump + [{"role": "assistant", "content": partner or record.completion}], images,
                                    **kwargs)
        return EncodedKTO(completion, mismatched, record.desirable)
    return adapter.encode_prompt(dump, images, **kwargs)


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
    key = (settings.model_path, settings.adapter)
    if key not in _ADAPTERS:
        from vlrlhf.models.registry import load_adapter

        _ADAPTERS[key] = load_adapter(settings.model_path, adapter=settings.adapter)
    return _ADAPTERS[key]


def encode_batch(batch: dict, settings: EncodeSettings) -> dict:
    """Ray Data map function: encode a batch of pickled records. Bad records come back as
    rows with `reason`/`message` set; the consumer applies the policy."""
    adapter = cached_adapter(settings)
    out = {"position": [], "payload": [], "reason": [], "message": []}
    for position, blob in zip(batch["position"], batch["record"], strict=True):
        record, partner = pickle.loads(blob)
        payload, reason, message = b"", "", ""
        try:
            encoded = encode_record(adapter, record, settings, partner)
            payload = pickle.dumps(EncodedItem(int(position), record.id, record, encoded))
        except (ImageError, EncodeError) as error:
            reason, message = error.reason, f"{record.id}: {error}"
        out["position"].append(int(position))
        out["payload"].append(payload)
        out["reason"].append(reason)
        out["message"].append(message)
    return {key: np.array(values, dtype=object) if key != "position" else np.array(values)
            for key, values in out.items()}


def in_eval_split(record_id: str, eval_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction


def split_records(records: list, eval_fraction: float = 0.0, seed: int = 0) -> tuple[list, list]:
    """(train, eval) by a hash of each record id: stable under reordering and resume."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must lie in [0, 1)")
    train, held_out = [], []
    for record in records:
        (held_out if eval_fraction and in_eval_split(record.id, eval_fraction, seed) else train).append(record)
    return train, held_out


def ordered(records: list, seed: int | None, epoch: int = 0) -> list:
    """The records in this epoch's order: a permutation drawn from (seed, epoch); None keeps file order."""
    if seed is None:
        return list(records)
    permutation = np.random.default_rng([seed, epoch]).permutation(len(records))
    return [records[i] for i in permutation]


@dataclasses.dataclass(frozen=True)
class PipelineResources:
    """What the encode stage may take from the cluster: CPUs per task and tasks at once
    (None: as many as Ray Data likes). jobs.common.pipeline_budget derives them from the
    spec and what the actor groups leave free."""

    task_cpus: float = 1.0
    concurrency: int | None = None


def encoded_dataset(records: list, settings: EncodeSettings, *, start: int = 0, batch_size: int = 16,
                    resources: PipelineResources = PipelineResources()):
    """A Ray Data dataset of encoded rows for records[start:], in order."""
    import ray

    if settings.task not in TASKS:
        raise ValueError(f"task={settings.task!r} is not one of {', '.join(TASKS)}")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    # KTO: each record is paired with the next record's completion (cyclically) for the KL term.
    partners = [getattr(records[(i + 1) % len(records)], "completion", None) for i in range(len(records))]
    rows = [{"position": position, "record": pickle.dumps((record, partners[position]))}
            for position, record in enumerate(records) if position >= start]
    if not rows:
        return ray.data.from_items([{"position": 0, "record": b""}]).limit(0)
    blocks = max(1, min(len(rows) // batch_size, 64))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    return dataset.map_batches(encode_batch, fn_kwargs={"settings": settings}, batch_size=batch_size,
                               batch_format="numpy", concurrency=resources.concurrency,
                               num_cpus=resources.task_cpus)


def iter_encoded(dataset, bad: BadRecords) -> Iterator[EncodedItem]:
    """Encoded items in order; bad rows go through the policy (raise, or count + quarantine)."""
    for row in dataset.iter_rows():
        if row["reason"]:
            where, _, message = str(row["message"]).partition(": ")
            bad.handle(where, str(row["reason"]), message, stage="encode")
            continue
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
    """ModelBatch for conversations and prompts, PairBatch for pairs, KTOBatch for KTO."""
    first = items[0].encoded
    if isinstance(first, EncodedPair):
        corrupted = None
        if first.corrupted is not None:
            corrupted = adapter.collate([i.encoded.corrupted for i in items], padding_side)
        return PairBatch(adapter.collate([i.encoded.chosen for i in items], padding_side),
                         adapter.collate([i.encoded.rejected for i in items], padding_side), corrupted)
    if isinstance(first, EncodedKTO):
        import torch

        return KTOBatch(adapter.collate([i.encoded.completion for i in items], padding_side),
                        adapter.collate([i.encoded.mismatched for i in items], padding_side),
                        torch.tensor([i.encoded.desirable for i in items]))
    return adapter.collate([i.encoded for i in items], padding_side)
