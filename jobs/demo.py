"""`vlrlhf demo`: build every tiny checkpoint, then encode, score and generate with each.

This is the end-to-end check of the model layer on a fresh machine: each family is
loaded from its folder through the same code that loads real checkpoints.
"""

from __future__ import annotations

import pathlib
import time

import torch
from PIL import Image, ImageDraw

from vlrlhf.models.logprobs import sequence_logprobs
from vlrlhf.models.registry import load_adapter
from vlrlhf.models.tiny import FAMILIES, build_tiny_model


def draw_shape(colour: str, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=colour)
    return image


def check_family(family: str, path: pathlib.Path) -> dict:
    started = time.perf_counter()
    adapter = load_adapter(path)
    model = adapter.load_model().eval()
    images = [draw_shape("red")]
    conversation = [{"role": "user", "content": "<image>\nWhat colour is the triangle?"},
                    {"role": "assistant", "content": "red"}]
    batch = adapter.collate([adapter.encode(conversation, images)])
    with torch.no_grad():
        logps = sequence_logprobs(adapter.token_logprobs(model, batch), batch.loss_mask)
    prompt = adapter.collate([adapter.encode_prompt(conversation[:1], images)], padding_side="left")
    generated = adapter.generate(model, prompt, max_new_tokens=6)[0]
    return {"family": family, "model_type": adapter.config.model_type,
            "params": sum(p.numel() for p in model.parameters()),
            "tokens": batch.input_ids.shape[1], "label_tokens": int(batch.loss_mask.sum()),
            "answer_logp": float(logps[0]), "generated": len(generated),
            "seconds": time.perf_counter() - started}


def run_model_demo(out_dir: str | pathlib.Path = ".demo/tiny") -> list[dict]:
    rows = []
    for family in FAMILIES:
        path = build_tiny_model(family, pathlib.Path(out_dir) / family)
        rows.append(check_family(family, path))
    header = (f"{'family':<14}{'model_type':<14}{'params':>9}{'tokens':>8}{'labels':>8}"
              f"{'log p(answer)':>15}{'gen':>5}{'s':>6}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['family']:<14}{row['model_type']:<14}{row['params']:>9,}{row['tokens']:>8}"
              f"{row['label_tokens']:>8}{row['answer_logp']:>15.3f}{row['generated']:>5}{row['seconds']:>6.1f}")
    return rows
