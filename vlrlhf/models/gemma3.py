"""Gemma 3: SigLIP, pooled soft tokens between <start_of_image> and <end_of_image>, a Gemma 3
language model. `token_type_ids` (1 on an image's soft tokens) are always passed: the model
lets an image's tokens attend to each other both ways (causal otherwise), and the packed
forwards keep that rule in their mask (pair_attention)."""

from __future__ import annotations

import torch

from vlrlhf.models.base import Adapter


def image_blocks(types: torch.Tensor) -> torch.Tensor:
    """(B, N) block id of each image token (runs of token type 1), -1 elsewhere."""
    image = types == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0), value=False)[:, :-1]
    return torch.where(image, starts.long().cumsum(-1) - 1, torch.full_like(types, -1, dtype=torch.long))


class Gemma3Adapter(Adapter):
    model_types = ("gemma3",)
    pair_forward = "packed"
    extra_rules = {"pixel_values": "concat"}
    token_arrays = ("token_type_ids",)
    completion_token_arrays = {"token_type_ids": 0}  # sampled answers are text

    def pair_attention(self, plan, inputs):
        """Causal, plus each image's soft tokens seeing one another (the model's rule), which
        all lie in the shared prefix."""
        blocks = image_blocks(inputs["token_type_ids"])
        if ((blocks >= 0) & (plan.branch > 0)).any():
            return None
        same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        return plan.allowed() | same

    def vision_modules(self, model):
        return [model.model.vision_tower]
