"""Synthetic zoom-in tasks for multi-turn RL with tools (configs/demo_agent_*.yaml).

Each image is white with a small framed box in one of its corners holding a digit too small to read at
the model's resolution; the question asks for the digit and says to zoom in first. The
worked transcript (the cold start before GRPO) calls the built-in `zoom` tool on the box,
reads the enlarged crop the tool returns, and answers in a box:

    user       <image> What digit is written in the small box? ...
    assistant  <tool_call>{"name": "zoom", "arguments": {"box": [x0, y0, x1, y1]}}</tool_call>
    user       <tool_response> <image> </tool_response>        (the zoom() of that box)
    assistant  \\boxed{7}

Files (image_root = the folder):
  agent.jsonl       online prompts (format `prompts`): {"prompt", "images", "answer"}
  agent_sft.json    LLaVA conversations of the transcript above (format `llava`), two images
                    each: the figure and its zoom, written by vlrlhf.tools.zoom itself

Deterministic for a seed.
"""

from __future__ import annotations

import json
import pathlib
import random

from PIL import Image, ImageDraw

from vlrlhf.data.synthetic import write_rows

SIZE = 112
BOX = 16
CORNERS = ((8, 8), (88, 8), (8, 88), (88, 88))  # where the box is: a corner, so the call is learnable
QUESTION = ("What digit is written in the small box? Zoom in on it first with the zoom tool: "
            '<tool_call>{"name":"zoom","arguments":{"box":[x0,y0,x1,y1]}}</tool_call>. '
            "Then give the digit as \\boxed{}.")


def draw(digit: int, x: int, y: int, size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    pen.rectangle([x, y, x + BOX, y + BOX], outline="black")
    pen.text((x + 5, y + 2), str(digit), fill="black")
    return image


def call_text(box: list[int]) -> str:
    call = json.dumps({"name": "zoom", "arguments": {"box": box}}, separators=(",", ":"))
    return f"<tool_call>{call}</tool_call>"


def synthesize_agent(out_dir: str | pathlib.Path, *, count: int = 64, seed: int = 0) -> dict[str, pathlib.Path]:
    """Write the zoom task's files and images to `out_dir` (their image_root). Returns the paths."""
    from vlrlhf.tools import zoom

    out = pathlib.Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"agent-{seed}")
    prompts, sft = [], []
    for index in range(count):
        digit = rng.randrange(10)
        x, y = rng.choice(CORNERS)
        figure = draw(digit, x, y)
        name, zoomed = f"images/{index:04d}.png", f"images/{index:04d}_zoom.png"
        figure.save(out / name, format="PNG", optimize=False)
        box = [x - 2, y - 2, x + BOX + 3, y + BOX + 3]
        zoom([figure], box).save(out / zoomed, format="PNG", optimize=False)
        prompts.append({"prompt": f"<image>{QUESTION}", "images": [name], "answer": str(digit)})
        sft.append({"id": f"agent-{index}", "images": [name, zoomed], "conversations": [
            {"from": "human", "value": f"<image>{QUESTION}"},
            {"from": "gpt", "value": call_text(box)},
            {"from": "human", "value": "<tool_response>\n<image>\n</tool_response>"},
            {"from": "gpt", "value": f"\\boxed{{{digit}}}"}]})
    write_rows(prompts, out / "agent.jsonl")
    write_rows(sft, out / "agent_sft.json")
    return {"agent.jsonl": out / "agent.jsonl", "agent_sft.json": out / "agent_sft.json"}

