"""LLaVA-NeXT (LLaVA-1.6): any-resolution patches of each image."""

from vlrlhf.models.base import Adapter


class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    pair_forward = "packed"
    # pixel_values: (n_images, n_patches, 3, H, W), n_patches depends on the image's
    # aspect ratio, so it is padded to the batch maximum; image_sizes: (n_images, 2).
    extra_rules = {"pixel_values": "concat_pad", "image_sizes": "concat"}
