"""Conversations and images used by the model tests."""

from PIL import Image, ImageDraw


def shape_image(colour: str = "red", size: tuple[int, int] = (56, 56)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    width, height = size
    ImageDraw.Draw(image).ellipse([4, 4, width - 4, height - 4], fill=colour)
    return image


def single_turn(question: str = "What colour is the circle?", answer: str = "red"):
    return [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]


def multi_turn():
    """Two images in two user turns, two answers."""
    return [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And in <image>?"},
        {"role": "assistant", "content": "blue"},
    ], [shape_image("red"), shape_image("blue", (84, 56))]


def text_only():
    return [{"role": "user", "content": "How many circles are there?"}, {"role": "assistant", "content": "three"}]


def label_spans(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of scored label ids."""
    spans, current = [], []
    for label in labels:
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans
