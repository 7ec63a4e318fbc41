"""mDPO's corrupted images: a small random crop of the original, resized back.

mDPO (Wang+ 2024) contrasts the chosen answer given the real image with the same
answer given an image that keeps only a small part of the original (a random crop of
1-20% of the area), so the preference must come from the image. The crop is resized
to the original size: the model sees as many image tokens as for the real image.
Seeded by the record id, so every epoch and every worker sees the same corruption.
"""

from __future__ import annotations

import hashlib
import math
import random

from PIL import Image


def corrupt_image(image: Image.Image, key: str, min_keep: float = 0.01, max_keep: float = 0.2) -> Image.Image:
    """A crop keeping a fraction in [min_keep, max_keep] of the area (aspect kept), resized back."""
    if not 0 < min_keep <= max_keep <= 1:
        raise ValueError(f"need 0 < min_keep={min_keep} <= max_keep={max_keep} <= 1")
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    keep = rng.uniform(min_keep, max_keep)
    width, height = image.size
    crop_w = max(1, round(width * math.sqrt(keep)))
    crop_h = max(1, round(height * math.sqrt(keep)))
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    return image.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BILINEAR)
