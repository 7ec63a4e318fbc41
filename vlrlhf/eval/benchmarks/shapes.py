"""A synthetic benchmark from the shapes data, in the VLMEvalKit MMBench layout.

Each held-out shapes question becomes a multiple-choice question over every colour
(or shape), with one row per rotation of the options (index + k * 1_000_000, image
cell = the index of the first rotation, as MMBench's circular files do), scored by
MMBench's circular rule. The prompt is the bare question, as the demo models were
trained; the option is read from the answer text. `build_shapes_bench` writes it.
"""

from __future__ import annotations

import base64
import json
import pathlib

from vlrlhf.eval.benchmarks.mmbench import ROTATION_BASE, MMBench
from vlrlhf.eval.tsv import OPTION_LETTERS, write_tsv


class ShapesBench(MMBench):
    name = "shapes"
    files = ("Shapes",)

    def prompt(self, item) -> str:
        return item.question


def build_shapes_bench(shapes_dir: str | pathlib.Path, out_path: str | pathlib.Path, limit: int | None = None) -> int:
    """Write Shapes_MC.tsv-style rows from `shapes_dir/test_sft.json`; returns the question count."""
    from vlrlhf.data.synthetic import COLOURS, SHAPES

    shapes_dir = pathlib.Path(shapes_dir)
    records = json.loads((shapes_dir / "test_sft.json").read_text())[:limit]
    letters = OPTION_LETTERS[:4]
    rows = []
    for number, record in enumerate(records):
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        answer = record["conversations"][1]["value"].strip()
        kind = "colour" if "colour" in question else "shape"
        choices = list(COLOURS) if kind == "colour" else list(SHAPES)
        image = base64.b64encode((shapes_dir / record["image"]).read_bytes()).decode()
        for rotation in range(len(choices)):
            rotated = choices[rotation:] + choices[:rotation]
            options = {letter: (rotated[i] if i < len(rotated) else "") for i, letter in enumerate(letters)}
            rows.append({"index": number + rotation * ROTATION_BASE, "image": image if rotation == 0 else str(number),
                         "question": question, **options, "answer": letters[rotated.index(answer)],
                         "category": kind, "l2-category": "perception"})
    write_tsv(out_path, rows)
    return len(records)
