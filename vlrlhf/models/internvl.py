"""InternVL (transformers' native `internvl`: InternVL3, InternVL3.5 "-hf" checkpoints):
InternViT, pixel shuffle and an MLP projector into Qwen2/Llama. Each image is cut into
tiles (plus a thumbnail) by its aspect ratio; the processor wraps each image's
image_seq_length x tiles context tokens in <img> ... </img>."""

import torch

from vlrlhf.models.base import Adapter, _ImagesOnce


class InternVLAdapter(Adapter):
    model_types = ("internvl",)
    pair_forward = "packed"
    # pixel_values: (tiles over the batch's images, 3, H, W), flat in placeholder order
    extra_rules = {"pixel_values": "concat"}

    def tokenize(self, text, images):
        """The processor reassembles the tiles image by image into a new tensor on every call;
        inside images_once, the image processor's own (equal) tensor is kept instead, so a
        pair's chosen and rejected rows share one pixel tensor as in the other families."""
        result = super().tokenize(text, images)
        once = self.processor.image_processor
        if images and isinstance(once, _ImagesOnce):
            output = once.output_for(images)
            pixels = result.get("extras", {}).get("pixel_values")
            if output is not None and pixels is not None and torch.equal(output["pixel_values"], pixels):
                result["extras"]["pixel_values"] = output["pixel_values"]
        return result
