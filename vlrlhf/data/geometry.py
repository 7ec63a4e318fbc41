"""Synthetic geometry problems in the layout of geometry3k (hiyouga/geometry3k, veRL's geo3k).

Each image is a figure drawn here with its given quantities written on it; the problem
names the same quantities, and the answer follows from them by a formula:

  hypotenuse    a right triangle with legs a, b (Pythagorean triples): c
  isosceles     a right triangle with equal legs a: a\\sqrt{2}
  angle         a triangle with two angles given: the third, in degrees
  equilateral   an equilateral triangle with side s: its area, \\frac{s^2\\sqrt{3}}{4}
  rectangle     a rectangle w x h: its area

Files (format `geometry3k`):
  geometry.jsonl, test_geometry.jsonl   {"images": [path], "problem": "<image>...", "answer": latex}
  geometry_sft.json                     LLaVA conversations with a worked answer,
                                        "<think>6^2+8^2=10^2</think>\\boxed{10}" (format: llava):
                                        a cold start before GRPO with the `math` reward

Deterministic for a seed.
"""

from __future__ import annotations

import math
import pathlib
import random

from PIL import Image, ImageDraw

from vlrlhf.data.synthetic import write_rows

KINDS = ("hypotenuse", "isosceles", "angle", "equilateral", "rectangle")
TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (8, 15, 17), (9, 12, 15))
SIZE = 112


def square_root_form(n: int) -> str:
    """sqrt(n) as k\\sqrt{m} with m square-free (or k when n is a square)."""
    k = 1
    for f in range(int(math.isqrt(n)), 1, -1):
        if n % (f * f) == 0:
            k = f
            break
    m = n // (k * k)
    if m == 1:
        return str(k)
    return f"{k}\\sqrt{{{m}}}" if k > 1 else f"\\sqrt{{{m}}}"


def problem(kind: str, rng: random.Random) -> dict:
    """One problem: its text, answer (LaTeX), worked reasoning, and what the figure shows."""
    if kind == "hypotenuse":
        a, b, c = rng.choice(TRIPLES)
        return {"problem": f"In the right triangle, the legs are {a} and {b}. Find the hypotenuse.",
                "answer": str(c), "reasoning": f"{a}^2+{b}^2={c}^2",
                "figure": ("right", [str(a), str(b), "?"])}
    if kind == "isosceles":
        a = rng.randint(2, 9)
        return {"problem": f"In the right triangle, both legs are {a}. Find the hypotenuse.",
                "answer": square_root_form(2 * a * a), "reasoning": f"{a}^2+{a}^2={2 * a * a}",
                "figure": ("right", [str(a), str(a), "?"])}
    if kind == "angle":
        a, b = rng.randint(3, 9) * 10, rng.randint(2, 8) * 5
        return {"problem": f"Two angles of the triangle are {a} and {b} degrees. Find the third angle in degrees.",
                "answer": f"{180 - a - b}", "reasoning": f"180-{a}-{b}",
                "figure": ("any", [f"{a}°", f"{b}°", "?"])}
    if kind == "equilateral":
        s = 2 * rng.randint(1, 5)
        area = f"{s * s // 4}\\sqrt{{3}}" if s * s // 4 > 1 else "\\sqrt{3}"
        return {"problem": f"The equilateral triangle has side {s}. Find its area.", "answer": area,
                "reasoning": f"{s}^2/4",
                "figure": ("equilateral", [str(s), str(s), str(s)])}
    if kind == "rectangle":
        w, h = rng.randint(2, 12), rng.randint(2, 12)
        return {"problem": f"The rectangle is {w} by {h}. Find its area.", "answer": str(w * h),
                "reasoning": f"{w}*{h}", "figure": ("rectangle", [str(w), str(h)])}
    raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")


def draw(figure: tuple[str, list[str]], rng: random.Random, size: int = SIZE) -> Image.Image:
    """The figure in black on white, with its labels beside the sides (or at the corners for angles)."""
    shape, labels = figure
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    margin = size // 6 + rng.randint(0, size // 12)
    low, high = margin, size - margin
    if shape == "rectangle":
        top = low + rng.randint(0, size // 8)
        pen.rectangle([low, top, high, high], outline="black", width=2)
        pen.text(((low + high) // 2 - 4, high + 2), labels[0], fill="black")
        pen.text((high + 3, (top + high) // 2 - 4), labels[1], fill="black")
        return image
    if shape == "right":
        corners = [(low, high), (high, high), (low, low + rng.randint(0, size // 8))]
    elif shape == "equilateral":
        corners = [(low, high), (high, high), ((low + high) // 2, int(high - (high - low) * math.sqrt(3) / 2))]
    else:
        corners = [(low, high), (high, high), (low + rng.randint(0, high - low), low)]
    pen.polygon(corners, outline="black", width=2)
    if shape == "right":
        pen.rectangle([low, high - 8, low + 8, high], outline="black")
    if shape == "any":  # angles at the two base corners
        pen.text((low + 6, high - 14), labels[0], fill="black")
        pen.text((high - 24, high - 14), labels[1], fill="black")
        return image
    # sides: bottom (0-1), the left or second side (0-2), the third (1-2)
    for (p, q), label in zip([(0, 1), (0, 2), (1, 2)], labels, strict=True):
        x, y = (corners[p][0] + corners[q][0]) // 2, (corners[p][1] + corners[q][1]) // 2
        pen.text((x + (3 if x > size // 2 else -12), y + (2 if y > size * 3 // 4 else -4)), label, fill="black")
    return image


def make_items(count: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(f"geometry-{seed}-{split}")
    items = []
    for index in range(count):
        item = problem(KINDS[index % len(KINDS)], rng)
        item.update(index=index, image_seed=rng.randrange(2**31))
        items.append(item)
    return items


def synthesize_geometry(out_dir: str | pathlib.Path, *, num_train: int = 200, num_test: int = 50,
                        seed: int = 0) -> dict[str, pathlib.Path]:
    """Write the geometry files and images to `out_dir` (their image_root). Returns the paths."""
    out = pathlib.Path(out_dir)
    written = {}
    for split, count in (("train", num_train), ("test", num_test)):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        items = make_items(count, seed, split)
        for item in items:
            path = f"images/{split}/{item['index']:05d}.png"
            draw(item["figure"], random.Random(item["image_seed"])).save(out / path, format="PNG", optimize=False)
            item["image"] = path
        rows = [{"images": [i["image"]], "problem": f"<image>{i['problem']}", "answer": i["answer"]} for i in items]
        name = "geometry.jsonl" if split == "train" else "test_geometry.jsonl"
        write_rows(rows, out / name)
        written[name] = out / name
        if split == "train":
            sft = [{"id": f"geometry-{i['index']}", "image": i["image"], "conversations": [
                {"from": "human", "value": f"<image>\n{i['problem']} {INSTRUCTION}"},
                {"from": "gpt", "value": f"<think>{i['reasoning']}</think>\\boxed{{{i['answer']}}}"}]} for i in items]
            write_rows(sft, out / "geometry_sft.json")
            written["geometry_sft.json"] = out / "geometry_sft.json"
    return written


# appended to each problem by the geometry3k format unless format_options.instruction says otherwise
INSTRUCTION = "Reason inside <think> </think>, then give the final answer as \\boxed{}."
