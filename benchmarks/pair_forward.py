"""Preference forward + backward of one pair batch, three ways, on a LLaVA (576 image tokens).

    .venv/bin/python benchmarks/pair_forward.py [--batch 8] [--repeats 5] [--image-size 336] [--patch-size 14]

- separate: chosen and rejected as two batches (the vision tower and prompt twice);
- packed:   vlrlhf's pair_states (one row per pair, a 4D mask; models/pairs.py);
- prefix-KV: the prefix (image + prompt) once with its KV cache, repeated for the 2B
  continuations, which run as one batch on top of it (gradients through the cache).
  A sketch for timing: it needs every row's prefix to have the same length (the prompts
  here do), which is why vlrlhf does not ship it.
Repetitions alternate between the three; prints the median seconds of each.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def pairs_of(adapter, batch: int):
    from tests.models.helpers import shape_image, single_turn

    messages = [single_turn("What shape is in the image?", answer) for answer in ("square", "circle")]
    images = [[shape_image(colour)] for colour in ("red", "blue", "green", "grey") * (batch // 4 + 1)][:batch]
    both = adapter.collate([adapter.encode(m, image) for m in messages for image in images])  # one width
    rows = torch.arange(2 * batch)
    return (select(both, rows[:batch]), select(both, rows[batch:]))


def select(batch, rows):
    from vlrlhf.models.batch import ModelBatch

    pixels = batch.extras["pixel_values"][rows]
    return ModelBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], {"pixel_values": pixels})


def separate(adapter, model, chosen, rejected):
    return adapter.token_logprobs(model, chosen).sum() + adapter.token_logprobs(model, rejected).sum()


def packed(adapter, model, chosen, rejected):
    c, r = adapter.pair_token_logprobs(model, chosen, rejected)
    return c.sum() + r.sum()


def prefix_kv(adapter, model, chosen, rejected):
    from vlrlhf.models.logprobs import chunked_token_logprobs

    fork = int((chosen.input_ids != rejected.input_ids).int().argmax(-1).min())
    inner = model.model
    prefix = inner(input_ids=chosen.input_ids[:, :fork], pixel_values=chosen.extras["pixel_values"],
                   use_cache=True)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(2)
    suffix = torch.cat([chosen.input_ids[:, fork:], rejected.input_ids[:, fork:]])
    mask = torch.cat([torch.ones(len(suffix), fork, dtype=torch.long),
                      torch.cat([chosen.attention_mask[:, fork:], rejected.attention_mask[:, fork:]])], dim=1)
    positions = torch.arange(fork, chosen.input_ids.shape[1]).expand(len(suffix), -1)
    tail = inner.language_model(input_ids=suffix, attention_mask=mask, past_key_values=cache,
                                position_ids=positions, use_cache=True).last_hidden_state
    last = prefix.last_hidden_state[:, -1:].repeat(2, 1, 1)
    hidden = torch.cat([last, tail], dim=1)
    labels = torch.cat([chosen.labels[:, fork - 1:], rejected.labels[:, fork - 1:]])
    return chunked_token_logprobs(hidden, adapter.output_head(model), labels).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from dpo_vs_trl import TEXT, VISION

    from vlrlhf.models.registry import load_adapter
    from vlrlhf.models.tiny import build_tiny_model

    folder = build_tiny_model("llava", tempfile.mkdtemp(), text=TEXT, vision=VISION, image_size=args.image_size,
                              patch_size=args.patch_size)
    adapter = load_adapter(folder)
    model = adapter.load_model()
    chosen, rejected = pairs_of(adapter, args.batch)
    ways = {"separate": separate, "packed": packed, "prefix-KV": prefix_kv}
    values = {name: float(way(adapter, model, chosen, rejected)) for name, way in ways.items()}
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            way(adapter, model, chosen, rejected).backward()
            times[name].append(time.perf_counter() - started)
    print(f"batch {args.batch} pairs, {chosen.input_ids.shape[1]} tokens per row")
    for name in ways:
        print(f"{name:10s} {statistics.median(times[name]):7.3f} s fwd+bwd   (sum of log-probs {values[name]:.4f})")


if __name__ == "__main__":
    main()
