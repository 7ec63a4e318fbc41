"""Synthetic "shapes" data sets: coloured shapes on white, questions a tiny VLM can learn.

Every image shows one shape (circle, square or triangle) in one of four colours,
placed and sized at random. Questions ask for the colour or the shape. The files use
the public formats users bring, so the demo runs through the same converters:

  sft.json          LLaVA conversations                  (format: llava); the captioner
                    hallucinates from the question: asked the colour of a triangle it says
                    "red", of a square "blue", in 3 of 4 cases whatever the image shows
  preference.json   image/prompt/chosen/rejected         (format: plain_dpo); rejected is the
                    captioner's hallucination where it has one, else a plausible wrong
                    answer: another colour or another shape
  kto.jsonl         prompt/completion/label, half wrong  (format: kto)
  prompts.jsonl     prompt + reference answer            (format: prompts)
  test_*.{json,jsonl}  the same kinds on held-out images

Deterministic for a seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import pathlib
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
KINDS = ("sft", "preference", "kto", "prompts")
IMAGE_SIZE = 56
# The SFT captioner's systematic error, a language-prior hallucination as in real caption
# data (what RLHF-V's and POPE-style corrections target): asked the colour of a shape it
# answers from the question, not the image, at HALLUCINATION_RATE. The preference pairs
# prefer the truth over that answer, so DPO has a gap to close that SFT cannot.
HALLUCINATIONS = {"triangle": "red", "square": "blue"}
HALLUCINATION_RATE = 0.75


def draw(shape: str, colour: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    painter = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size - 8)
    left, top = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    box = [left, top, left + extent, top + extent]
    fill = COLOURS[colour]
    if shape == "circle":
        painter.ellipse(box, fill=fill)
    elif shape == "square":
        painter.rectangle(box, fill=fill)
    else:
        painter.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
    return image


def make_items(count: int, seed: int, split: str) -> list[dict]:
    """Image descriptions plus a question, its answer and a plausible wrong answer."""
    rng = random.Random(f"{seed}:{split}")
    items = []
    for index in range(count):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if rng.random() < 0.5:
            question, answer = f"What colour is the {shape}?", colour
            wrong = rng.choice([c for c in COLOURS if c != colour])
            task = "colour"
        else:
            question, answer = "What shape is in the image?", shape
            wrong = rng.choice([s for s in SHAPES if s != shape])
            task = "shape"
        image_seed = rng.random()
        caption = answer
        if task == "colour" and HALLUCINATIONS.get(shape, colour) != colour:
            wrong = HALLUCINATIONS[shape]
            if rng.random() < HALLUCINATION_RATE:
                caption = wrong
        items.append({"index": index, "shape": shape, "colour": colour, "question": question,
                      "answer": answer, "wrong": wrong, "caption": caption, "task": task,
                      "image_seed": image_seed})
    return items


def write_images(items: list[dict], out_dir: pathlib.Path, split: str) -> None:
    folder = out_dir / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        image = draw(item["shape"], item["colour"], random.Random(item["image_seed"]))
        path = folder / f"{item['index']:05d}.png"
        image.save(path, format="PNG", optimize=False)
        item["image"] = f"images/{split}/{item['index']:05d}.png"


def rows_for(kind: str, items: list[dict], split: str = "train") -> list[dict]:
    if kind == "sft":  # training captions carry the hallucination; test answers are the truth
        key = "caption" if split == "train" else "answer"
        return [{"id": f"shapes-{i['index']}", "image": i["image"], "conversations": [
            {"from": "human", "value": f"<image>\n{i['question']}"}, {"from": "gpt", "value": i[key]}]}
            for i in items]
    if kind == "preference":
        return [{"image": i["image"], "prompt": i["question"], "chosen": i["answer"], "rejected": i["wrong"]}
                for i in items]
    if kind == "kto":
        return [{"images": [i["image"]], "prompt": i["question"],
                 "completion": i["answer"] if i["index"] % 2 == 0 else i["wrong"], "label": i["index"] % 2 == 0}
                for i in items]
    if kind == "prompts":
        return [{"image": i["image"], "prompt": i["question"], "answer": i["answer"], "task": i["task"]}
                for i in items]
    raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")


FILE_NAMES = {"sft": "sft.json", "preference": "preference.json", "kto": "kto.jsonl", "prompts": "prompts.jsonl"}


def write_rows(rows: list[dict], path: pathlib.Path) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows, indent=1) + "\n")


def synthesize(out_dir: str | pathlib.Path, kinds: tuple[str, ...] = KINDS, *, num_train: int = 400,
               num_test: int = 100, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write the shapes data sets to `out_dir` (it becomes the image_root). Returns file paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kind={unknown[0]!r} is not one of {', '.join(KINDS)} (or all)")
    written = {}
    for split, count in (("train", num_train), ("test", num_test)):
        items = make_items(count, seed, split)
        write_images(items, out, split)
        for kind in kinds:
            name = FILE_NAMES[kind] if split == "train" else "test_" + FILE_NAMES[kind]
            write_rows(rows_for(kind, items, split), out / name)
            written[name] = out / name
    return written
