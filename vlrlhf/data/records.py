"""Validated records: what every data format is converted into.

Text carries one `<image>` placeholder per image, in order (converters insert
them at the start of the first user turn when a format has none). Images stay
unloaded here: an `ImageSource` is a path (relative to `image_root`), a data URI, a
base64 string or raw bytes, and is decoded later by vlrlhf.data.images inside the
Ray Data pipeline. Multi-turn, multi-image and text-only records are all valid.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGE_PLACEHOLDER = "<image>"  # one per image, in the text where the image goes

ImageSource = Union[str, bytes]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str


def _count(messages: list[Message]) -> int:
    return sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)


def _check_images(messages: list[Message], images: list, extra_text: tuple[str, ...] = ()) -> None:
    placeholders = _count(messages)
    if any(IMAGE_PLACEHOLDER in text for text in extra_text):
        raise ValueError("an answer holds an <image> placeholder; images belong to the prompt")
    if placeholders != len(images):
        raise ValueError(f"{placeholders} <image> placeholder(s) but {len(images)} image(s)")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = ""  # stable key "file:row[:k]", set by the reader; drives the eval split
    images: list[ImageSource] = Field(default_factory=list)


class Conversation(Record):
    """SFT: a whole conversation; every assistant turn is a target."""

    kind: Literal["conversation"] = "conversation"
    messages: list[Message]

    @model_validator(mode="after")
    def _valid(self):
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("a conversation needs at least one assistant turn")
        if self.messages[-1].role != "assistant":
            raise ValueError("a conversation must end with an assistant turn")
        _check_images(self.messages, self.images)
        return self


class PreferencePair(Record):
    """One prompt, a chosen and a rejected answer (DPO family, DDPO, mDPO)."""

    kind: Literal["preference"] = "preference"
    prompt: list[Message]  # ends with a user turn
    chosen: str
    rejected: str
    # DDPO: [start, end) character spans of `chosen` that correct the rejected answer.
    chosen_spans: list[tuple[int, int]] | None = None
    score_margin: float | None = None  # rating gap of the pair, when the data has ratings

    @model_validator(mode="after")
    def _valid(self):
        if not self.prompt or self.prompt[-1].role != "user":
            raise ValueError("a preference prompt must end with a user turn")
        _check_images(self.prompt, self.images, (self.chosen, self.rejected))
        for start, end in self.chosen_spans or []:
            if not 0 <= start < end <= len(self.chosen):
                raise ValueError(f"chosen span [{start}, {end}) lies outside the chosen answer")
        return self


class KTOExample(Record):
    """Unpaired feedback: a prompt, one completion, desirable or not."""

    kind: Literal["kto"] = "kto"
    prompt: list[Message]
    completion: str
    desirable: bool

    @model_validator(mode="after")
    def _valid(self):
        if not self.prompt or self.prompt[-1].role != "user":
            raise ValueError("a KTO prompt must end with a user turn")
        _check_images(self.prompt, self.images, (self.completion,))
        return self


class PromptRecord(Record):
    """Online RL: a prompt to sample from, with what rule rewards need."""

    kind: Literal["prompt"] = "prompt"
    prompt: list[Message]
    answer: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid(self):
        if not self.prompt or self.prompt[-1].role != "user":
            raise ValueError("a prompt must end with a user turn")
        _check_images(self.prompt, self.images)
        return self


AnyRecord = Union[Conversation, PreferencePair, KTOExample, PromptRecord]
RECORD_TYPES = {cls.model_fields["kind"].default: cls
                for cls in (Conversation, PreferencePair, KTOExample, PromptRecord)}


def record_from_dict(data: dict) -> AnyRecord:
    """Inverse of `record.model_dump()` (records travel through Ray Data as dicts)."""
    return RECORD_TYPES[data["kind"]].model_validate(data)


def with_placeholders(messages: list[dict], num_images: int) -> list[dict]:
    """Put `<image>` placeholders at the start of the first user turn when a format has
    none; leave messages alone when they already carry some."""
    if num_images == 0 or any(IMAGE_PLACEHOLDER in m.get("content", "") for m in messages):
        return messages
    out = [dict(m) for m in messages]
    for message in out:
        if message["role"] == "user":
            message["content"] = (IMAGE_PLACEHOLDER + "\n") * num_images + message["content"]
            break
    return out
