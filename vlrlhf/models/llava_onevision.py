"""LLaVA-OneVision (llava-hf layout): SigLIP tower, Qwen2. A row with one image gets
any-resolution tiles (up to 9, pooled beyond anyres_max_9) plus the base image; a row with
several images gets each one's base features only (num_image_tokens + a newline token),
so a turn's image tokens depend on how many images the whole row holds."""

from vlrlhf.models.base import count_placeholders
from vlrlhf.models.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    # pixel_values: (n_images, n_tiles, 3, H, W), padded to the batch's most tiles; image_sizes:
    # (n_images, 2), each image's original size; batch_num_images: (rows,), images per row
    # (the model tiles only the images of single-image rows)
    extra_rules = {"pixel_values": "concat_pad", "image_sizes": "concat", "batch_num_images": "concat"}

    def _prefix_length(self, messages, generation_prompt, images, full_ids, record) -> int:
        """A multi-image row expands every image to its base features, also in the turns before
        the last image: the prefix is expanded that way, not as a row of fewer images."""
        if len(images) <= 1 or count_placeholders(messages) == len(images):
            return super()._prefix_length(messages, generation_prompt, images, full_ids, record)
        processor = self.processor
        per_image = processor.num_image_tokens + 1 - (processor.vision_feature_select_strategy == "default")
        text = self.render(messages, generation_prompt)
        expanded = text.replace(processor.image_token, processor.image_token * per_image)
        prefix = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prefix)] != prefix:
            raise ValueError(f"{record}: the chat template of {self.path} does not tokenize turn by turn as a "
                             "prefix of the whole conversation, so assistant tokens cannot be located")
        return len(prefix)
