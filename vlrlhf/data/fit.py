"""The image-token budget: a record over `data.max_length` after image expansion is never cut.

Cutting a record's tokens can cut its image tokens, and the model then finds fewer image
tokens than image features (the peers' most common VLM failure). Here nothing is cut;
`data.image_overflow` says what happens to a record that is too long:

  resize  (default) lower its images' pixels until it fits: the image-token count is
          measured on the encoded record (the adapter's placeholder ids), the images are
          shrunk by the square root of the area the budget leaves them, and the record is
          encoded again. The scale is reported (the job's ledger counts resized records).
          A record whose text alone is too long, or whose family's image-token count does
          not fall with the pixels (fixed-resolution towers: LLaVA-1.5, PaliGemma, Gemma 3
          without pan-and-scan), is a bad record with its reason.
  skip    a bad record (reason too_long), skipped or raised as `data.on_bad_record` says.
  raise   the job stops, naming the record, whatever `data.on_bad_record` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vlrlhf.errors import ReasonError

OVERFLOWS = ("resize", "skip", "raise")
MIN_SIDE = 28  # smallest image side tried (a Qwen2-VL patch pair; below it towers upsample)
TRIES = 12
MARGIN = 0.97  # aim a little under the budget: token counts round up per patch or tile


class ImageOverflowError(ValueError):
    """A record over the budget under `image_overflow: raise` (not a bad row: the job stops)."""


class TooLong(ReasonError):
    """A record that does not fit max_length (reasons too_long, too_long_text, too_long_images)."""


def parts(encoded) -> list:
    """The encoded examples of an encoding (an example, a pair, a KTO example and its twin)."""
    if hasattr(encoded, "input_ids"):
        return [encoded]
    return [value for value in vars(encoded).values() if hasattr(value, "input_ids")]


def longest(encoded):
    return max(parts(encoded), key=len)


def image_tokens(example, placeholder_ids: set[int]) -> int:
    return sum(token in placeholder_ids for token in example.input_ids)


def resized(image, scale: float):
    from PIL import Image

    width, height = image.size
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def fit(encode: Callable[[list], object], images: list, *, max_length: int | None, overflow: str,
        placeholder_ids: Callable[[], list[int]], record: str) -> tuple[object, list, float]:
    """(encoded, the images it was encoded with, their scale) for a record within max_length.
    `encode(images)` encodes the record without a length check."""
    if overflow not in OVERFLOWS:
        raise ValueError(f"image_overflow={overflow!r} is not one of {', '.join(OVERFLOWS)}")
    encoded = encode(images)
    length = len(longest(encoded))
    if max_length is None or length <= max_length:
        return encoded, images, 1.0
    message = f"{record}: {length} tokens after image expansion exceed max_length={max_length}"
    if overflow == "raise":
        raise ImageOverflowError(f"{message} (data.image_overflow: raise; resize or skip would go on)")
    if overflow == "skip" or not images:
        raise TooLong("too_long", f"{message}; examples are never cut")
    ids = set(placeholder_ids())
    scale = 1.0
    for _ in range(TRIES):  # tiling families keep their count over a range of sizes: go on to MIN_SIDE
        example = longest(encoded)
        vision = image_tokens(example, ids)
        text = len(example) - vision
        if text >= max_length:
            raise TooLong("too_long_text", f"{message}; its text alone is {text} tokens, so no image size fits")
        area = (max_length - text) / vision if vision else 0.5
        scale *= min(math.sqrt(area) * MARGIN, 0.9)
        if min(min(image.size) for image in images) * scale < MIN_SIDE:
            break
        sized = [resized(image, scale) for image in images]
        encoded = encode(sized)
        if len(longest(encoded)) <= max_length:
            return encoded, sized, scale
    raise TooLong("too_long_images", f"{message}; its images shrunk to {scale:.3g} of their sides still did not "
                                     "fit (this family's image-token count may not depend on the image size)")
