"""One prefill per prompt for a group of n samples (the transformers rollout engine).

`generate` with each prompt repeated n times runs the vision tower and the prompt's
prefill n times. Here the prompts (all but their last token) run once, with their images,
into a KV cache; the cache is repeated n times along the batch, and `generate` continues
from it with each prompt's last token, so only the sampling itself runs per sample. The
positions are the ones `generate` would give (1D from the attention mask; M-RoPE families
compute theirs in the prefill, and their per-row offsets, `rope_deltas`, are repeated with
the cache). Tested per family: the same greedy tokens and logits within 1e-5 of the
repeated prompts (tests/actors/test_group_prefill.py). A family where that does not hold
sets `Adapter.shared_prefill = False` (PaliGemma: its prefix-LM token types;
InstructBLIP: its own generate).
"""

from __future__ import annotations

import torch

from vlrlhf.models.base import unwrap


def prefilled(adapter, model, batch, n: int) -> tuple[dict[str, torch.Tensor], object]:
    """(generate's inputs for the n samples of every prompt of the left-padded `batch`, the
    KV cache of the prompts but their last token, repeated n times)."""
    from transformers import DynamicCache

    inputs = adapter.model_inputs(batch)
    per_token = [name for name in ("input_ids", "attention_mask", *adapter.token_arrays) if name in inputs]
    prefix = dict(inputs)
    for name in per_token:
        prefix[name] = inputs[name][:, :-1]
    cache = DynamicCache(config=unwrap(model).config)
    body = getattr(unwrap(model), "model", None)
    if hasattr(body, "rope_deltas"):  # M-RoPE: positions from the image grids, computed by the model
        body.rope_deltas = None
        model(**prefix, past_key_values=cache, use_cache=True)
        body.rope_deltas = body.rope_deltas.repeat_interleave(n, 0)
    else:
        mask = inputs["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        model(**prefix, position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(n)
    return {name: inputs[name].repeat_interleave(n, 0) for name in per_token}, cache
