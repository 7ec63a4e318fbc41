"""Public data formats -> records. One converter per format, chosen by `data.format`.

A converter is `convert(row: dict, context: FormatContext) -> list[record]`; it raises
`RecordError` for a bad row and calls `context.drop(reason)` for rows or pairs the
format's own rules discard (VLFeedback ties), so every drop is counted. A user's
converter is named by import path (`data.format: my_pkg.formats:convert`).

Files: JSON (a list, or {"data": [...]}), JSONL and Parquet, on local disk or any
pyarrow filesystem URI (s3://, gs://, ...). Rows are numbered from 1.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import io
import itertools
import json
import pathlib
import re
from collections.abc import Callable, Iterator

from pydantic import ValidationError

from vlrlhf.data.records import (IMAGE_PLACEHOLDER, Conversation, KTOExample, Message, PreferencePair, PromptRecord,
                                 record_from_dict, with_placeholders)
from vlrlhf.errors import ReasonError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "bot": "assistant", "model": "assistant"}


class RecordError(ReasonError):
    """A bad input row (missing field, wrong type, invalid JSON, ...)."""


@dataclasses.dataclass
class FormatContext:
    """What a converter may use besides the row: options and a tally of rule-based drops."""

    options: dict = dataclasses.field(default_factory=dict)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] += count


# ---------------------------------------------------------------- reading files

def open_binary(path: str) -> bytes:
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    return pathlib.Path(path).read_bytes()


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(row number from 1, row dict) for every row of a JSON, JSONL or Parquet file."""
    suffix = pathlib.PurePosixPath(path.split("?")[0]).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(open_binary(path)))
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row
        return
    text = open_binary(path).decode("utf-8")
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, RecordError("bad_json", f"invalid JSON ({error.msg} at column {error.colno})")
                continue
            yield number, row
        return
    if suffix != ".json":
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .json, .jsonl or .parquet")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of rows (or {{'data': [...]}})")
    yield from enumerate(data, start=1)


# ---------------------------------------------------------------- helpers

def field(row: dict, *names: str, required: bool = True, kind: type | tuple = str):
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, kind):
                raise RecordError("wrong_type", f"field {name!r} is {type(value).__name__}, expected "
                                                f"{getattr(kind, '__name__', kind)}")
            return value
    if required:
        raise RecordError("missing_field", f"missing field {' or '.join(repr(n) for n in names)}")
    return None


def images_of(row: dict) -> list:
    """The row's images from 'images' (list) or 'image' (one, or a list); paths, bytes or cells."""
    value = row.get("images", row.get("image"))
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)):
        return [value]
    if isinstance(value, list):
        return [item for item in value if item is not None]
    raise RecordError("wrong_type", f"field 'image(s)' is {type(value).__name__}")


def cell_to_source(image):
    """A Parquet/HF image cell {'bytes': b, 'path': p} -> bytes, else the value itself."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        if image.get("path"):
            return image["path"]
        raise RecordError("bad_image", "image cell without bytes or path")
    return image


def content_text(content) -> str:
    """A message content (string, or TRL/OpenAI parts) -> text with <image> placeholders."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise RecordError("wrong_type", "message content parts must be {'type': ...} objects")
            if part["type"] in ("image", "image_url"):
                pieces.append(IMAGE_PLACEHOLDER)
            elif part["type"] == "text":
                pieces.append(part.get("text") or "")
        return "".join(pieces)
    raise RecordError("wrong_type", f"message content is {type(content).__name__}")


def messages_of(turns, role_key: str = "role", text_key: str = "content") -> list[dict]:
    if isinstance(turns, str):
        return [{"role": "user", "content": turns}]
    if not isinstance(turns, list):
        raise RecordError("wrong_type", f"expected a list of messages, got {type(turns).__name__}")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", "a message must be an object")
        role = ROLES.get(str(turn.get(role_key, turn.get("from", ""))).lower())
        if role is None:
            raise RecordError("bad_role", f"unknown role {turn.get(role_key, turn.get('from'))!r}")
        out.append({"role": role, "content": content_text(turn.get(text_key, turn.get("value", "")))})
    return out


def answer_of(value) -> str:
    """A completion given as text or as a list of (assistant) messages."""
    if isinstance(value, str):
        return value
    messages = messages_of(value)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RecordError("wrong_type", "a completion must be a string or one assistant message")
    return messages[0]["content"]


def validated(cls, **fields):
    try:
        return cls(**fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        reason = "image_count_mismatch" if "placeholder" in first["msg"] else "invalid_record"
        raise RecordError(reason, f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def prompt_messages(row: dict, images: list, key: str = "prompt") -> list[Message]:
    raw = row.get(key)
    if raw is None:
        raise RecordError("missing_field", f"missing field {key!r}")
    messages = messages_of(raw) if not isinstance(raw, str) else [{"role": "user", "content": raw}]
    return with_placeholders(messages, len(images))


# ---------------------------------------------------------------- converters

def plain_dpo(row, context):
    """VL-RLHF's plain_dpo: {"image": path (optional), "prompt", "chosen", "rejected"}."""
    images = [cell_to_source(i) for i in images_of(row)]
    return [validated(PreferencePair, prompt=prompt_messages(row, images), chosen=field(row, "chosen"),
                      rejected=field(row, "rejected"), images=images)]


def conversations(row, context):
    """LLaVA / ShareGPT / VL-RLHF vlquery_json: {"image"|"images", "conversations": [{from, value}]}."""
    images = [cell_to_source(i) for i in images_of(row)]
    turns = field(row, "conversations", "messages", kind=list)
    messages = with_placeholders(messages_of(turns), len(images))
    return [validated(Conversation, messages=messages, images=images)]


def trl_preference(row, context):
    """TRL conversational preference rows: images, prompt/chosen/rejected as message lists or text."""
    images = [cell_to_source(i) for i in images_of(row)]
    return [validated(PreferencePair, prompt=prompt_messages(row, images), chosen=answer_of(row.get("chosen")),
                      rejected=answer_of(row.get("rejected")), images=images)]


def kto(row, context):
    """TRL unpaired rows: images, prompt, completion, label (bool)."""
    images = [cell_to_source(i) for i in images_of(row)]
    label = row.get("label")
    if not isinstance(label, bool):
        raise RecordError("wrong_type", f"field 'label' must be true/false, got {label!r}")
    return [validated(KTOExample, prompt=prompt_messages(row, images), completion=answer_of(row.get("completion")),
                      desirable=label, images=images)]


def _completions(row) -> list[dict]:
    completions = row.get("completions")
    if isinstance(completions, dict):  # Hugging Face datasets store it column-wise
        keys = list(completions)
        completions = [dict(zip(keys, values, strict=True)) for values in zip(*completions.values(), strict=True)]
    if not isinstance(completions, list):
        raise RecordError("missing_field", "missing field 'completions'")
    return completions


def mean_rating(annotations) -> float | None:
    """Mean of the per-aspect ratings (stored as strings); None if any is not a number."""
    if isinstance(annotations, str):
        annotations = json.loads(annotations)
    try:
        ratings = [float(aspect["Rating"]) for aspect in annotations.values()]
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return sum(ratings) / len(ratings) if ratings else None


def vlfeedback(row, context):
    """VLFeedback: every pair of completions of a prompt, ordered by mean rating.

    Ties and completions with a non-numeric rating are dropped and counted. Option
    `score_margin` (default 0): keep pairs whose rating gap is >= it; -1 keeps only the
    largest-gap pair per prompt (the first such pair in completion order).
    """
    margin = float(context.options.get("score_margin", 0))
    images = [cell_to_source(i) for i in images_of({"image": row.get("image", row.get("img_path"))})]
    prompt = with_placeholders([{"role": "user", "content": field(row, "prompt")}], len(images))
    scored = []
    for completion in _completions(row):
        rating = mean_rating(completion.get("annotations"))
        if rating is None:
            context.drop("non_numeric_rating")
            continue
        scored.append((rating, field(completion, "response")))
    pairs = []
    for (score_a, text_a), (score_b, text_b) in itertools.combinations(scored, 2):
        if score_a == score_b:
            context.drop("tie")
            continue
        chosen, rejected = (text_a, text_b) if score_a > score_b else (text_b, text_a)
        pairs.append((abs(score_a - score_b), chosen, rejected))
    if margin == -1 and pairs:
        widest = max(gap for gap, _, _ in pairs)
        keep = [next(p for p in pairs if p[0] == widest)]
    else:
        keep = [p for p in pairs if p[0] >= margin]
    context.drop("below_margin", len(pairs) - len(keep))
    return [validated(PreferencePair, prompt=prompt, chosen=chosen, rejected=rejected, images=images,
                      score_margin=gap) for gap, chosen, rejected in keep]


def correction_spans(chosen: str, rejected: str) -> list[tuple[int, int]]:
    """[start, end) character spans of `chosen` whose words differ from `rejected` (word-level diff)."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", chosen)]
    matcher = difflib.SequenceMatcher(a=[chosen[s:e] for s, e in words], b=rejected.split(), autojunk=False)
    spans = []
    for tag, i1, i2, _, _ in matcher.get_opcodes():
        if tag in ("replace", "delete"):  # chosen words replaced, or absent from the rejected answer
            spans.append((words[i1][0], words[i2 - 1][1]))
    return spans


def rlhfv(row, context):
    """RLHF-V: `text` holds JSON {question, chosen, rejected}; image as bytes cell or path.
    The corrected segments of `chosen` (word diff against `rejected`) become chosen_spans,
    unless the row brings its own `corrections` ([[start, end], ...])."""
    try:
        text = json.loads(field(row, "text"))
    except json.JSONDecodeError as error:
        raise RecordError("bad_json", f"field 'text' is not JSON ({error.msg})") from None
    if not isinstance(text, dict):
        raise RecordError("wrong_type", "field 'text' must hold a JSON object")
    image = row.get("image") or row.get("image_path")
    images = [cell_to_source(image)] if image else []
    chosen, rejected = field(text, "chosen"), field(text, "rejected")
    spans = text.get("corrections") or row.get("corrections")
    spans = [tuple(s) for s in spans] if spans else correction_spans(chosen, rejected)
    prompt = with_placeholders([{"role": "user", "content": field(text, "question")}], len(images))
    return [validated(PreferencePair, prompt=prompt, chosen=chosen, rejected=rejected, images=images,
                      chosen_spans=spans)]


def rlaifv(row, context):
    """RLAIF-V: question, chosen, rejected, image as a bytes cell (or image_path)."""
    image = row.get("image") or row.get("image_path")
    images = [cell_to_source(image)] if image else []
    prompt = with_placeholders([{"role": "user", "content": field(row, "question")}], len(images))
    return [validated(PreferencePair, prompt=prompt, chosen=field(row, "chosen"), rejected=field(row, "rejected"),
                      images=images)]


def prompts(row, context):
    """Online RL prompts: prompt (text or messages), image(s), optional answer; the other
    fields become metadata for reward functions."""
    images = [cell_to_source(i) for i in images_of(row)]
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RecordError("wrong_type", f"field 'answer' is {type(answer).__name__}")
    metadata = {k: v for k, v in row.items() if k not in ("prompt", "image", "images", "answer")}
    return [validated(PromptRecord, prompt=prompt_messages(row, images), images=images,
                      answer=None if answer is None else str(answer), metadata=metadata)]


def geometry3k(row, context):
    """Maths with images in the layout of hiyouga/geometry3k: images, problem (with <image>
    placeholders or none), answer; veRL's geo3k parquet (prompt messages, reward_model.ground_truth)
    reads too. `format_options.instruction` is appended to the problem (default: think, then
    a boxed answer, what the `math` reward reads; "" for none)."""
    from vlrlhf.data.geometry import INSTRUCTION

    images = [cell_to_source(i) for i in images_of(row)]
    graded = row.get("reward_model")
    answer = row.get("answer", graded.get("ground_truth") if isinstance(graded, dict) else None)
    if answer is None:
        raise RecordError("missing_field", "missing field 'answer' (or reward_model.ground_truth)")
    if not isinstance(answer, (str, int, float)):
        raise RecordError("wrong_type", f"field 'answer' is {type(answer).__name__}")
    instruction = context.options.get("instruction", INSTRUCTION)
    if "problem" in row:
        text = field(row, "problem")
        messages = [{"role": "user", "content": f"{text} {instruction}".strip() if instruction else text}]
    else:
        messages = messages_of(field(row, "prompt", kind=(str, list)))
    metadata = {k: v for k, v in row.items() if k not in ("prompt", "problem", "image", "images", "answer")}
    return [validated(PromptRecord, prompt=with_placeholders(messages, len(images)), images=images,
                      answer=str(answer), metadata=metadata)]


def records(row, context):
    """vlrlhf's own records, as `record.model_dump()` writes them (quarantine files, synthetic data)."""
    try:
        return [record_from_dict(row)]
    except (KeyError, ValidationError) as error:
        raise RecordError("invalid_record", str(error).splitlines()[0]) from None


FORMATS: dict[str, Callable] = {
    "plain_dpo": plain_dpo, "vlquery_json": conversations, "llava": conversations, "sharegpt": conversations,
    "trl_preference": trl_preference, "kto": kto, "vlfeedback": vlfeedback, "rlhfv": rlhfv, "rlaifv": rlaifv,
    "prompts": prompts, "geometry3k": geometry3k, "records": records,
}


def get_converter(name: str) -> Callable:
    if name in FORMATS:
        return FORMATS[name]
    if ":" in name:
        from vlrlhf.models.registry import import_object

        return import_object(name, "data.format")
    raise ValueError(f"data.format={name!r} is not one of {', '.join(FORMATS)} (or 'package.module:function')")
