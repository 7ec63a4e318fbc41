"""Idefics3 and SmolVLM: SigLIP tower, pixel-shuffle connector, per-image tiles."""

from vlrlhf.models.base import Adapter


class Idefics3Adapter(Adapter):
    model_types = ("idefics3", "smolvlm")
    pair_forward = "packed"
    # pixel_values: (B, n_images, 3, H, W) and pixel_attention_mask: (B, n_images, H, W),
    # padded per row with all-zero images, which the model recognises and skips.
    extra_rules = {"pixel_values": "stack_pad", "pixel_attention_mask": "stack_pad"}

    def vision_modules(self, model):
        return [model.model.vision_model]
