"""LLaVA-1.5 (llava-hf layout): CLIP tower + MLP projector + Llama/Vicuna."""

from vlrlhf.models.base import Adapter


class LlavaAdapter(Adapter):
    model_types = ("llava",)
    pair_forward = "packed"
    raw_pixels = True  # its processor normalises last
    # pixel_values: (n_images, 3, H, W), flat over the batch in placeholder order.
    extra_rules = {"pixel_values": "concat"}
