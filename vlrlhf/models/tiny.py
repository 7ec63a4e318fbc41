"""Tiny random checkpoints of every supported VLM family, built locally.

`build_tiny_model(family, out_dir)` writes a folder in the layout real hub
checkpoints use (config.json, model.safetensors, tokenizer, processor and image
processor configs, chat template), so tests and demos load it through the same
`from_pretrained` path as a real checkpoint. Nothing is downloaded: the
tokenizer is a byte-level BPE trained here on a small corpus.

Sizes follow FACTS.md: text hidden 128 in 2 layers with head size 64 (vLLM's CPU
attention needs a supported head size), vision 32-d in 2 layers, 56x56 images.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from vlrlhf.models import templates

IMAGE_SIZE = 56
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

CORPUS = [
    "What colour is the triangle? The triangle is red.",
    "How many circles are there? There are three circles.",
    "Describe the image in one sentence. A blue square and a green circle on white.",
    "red green blue yellow purple orange black white grey pink brown cyan",
    "circle square triangle star ellipse rectangle shape shapes colour color",
    "one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9",
    "Yes No yes no A B C D E Answer answer the question with a single word.",
    "USER: ASSISTANT: system user assistant Question: Answer: You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. Is there a cat in the image?",
]


def train_tokenizer(special_tokens: list[str], vocab_size: int = 420) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) trained on CORPUS; special tokens get ids 0..k-1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def wrap_tokenizer(special_tokens: list[str], *, bos: str | None, eos: str, pad: str,
                   extra: dict[str, str] | None = None, **kwargs) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(special_tokens), bos_token=bos, eos_token=eos,
        pad_token=pad, unk_token=None, extra_special_tokens=extra or {}, **kwargs)
    return tokenizer


def _text_config(tokenizer, **overrides) -> dict:
    config = dict(TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.update(overrides)
    return config


# ---------------------------------------------------------------- families

def build_llava(next_version: bool = False, text: dict | None = None, vision: dict | None = None,
                image_size: int = IMAGE_SIZE, patch_size: int = 14):
    """`text`, `vision`: overrides of TEXT and VISION; image_size / patch_size set the image
    tokens, (image_size // patch_size) ** 2 (benchmarks build larger LLaVAs this way)."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaNextConfig,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = wrap_tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>",
                               extra={"image_token": "<image>"}, add_bos_token=True)
    vision = dict(VISION, model_type="clip_vision_model", image_size=image_size, patch_size=patch_size,
                  projection_dim=32, **(vision or {}))
    text_config = dict(_text_config(tokenizer), model_type="llama", **(text or {}))
    common = dict(vision_config=vision, text_config=text_config,
                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  tie_word_embeddings=False)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    if next_version:
        pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        image_processor = LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       patch_size=patch_size, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1,
                                       chat_template=templates.MISTRAL_INST)
    else:
        config = LlavaConfig(**common, image_seq_length=(image_size // patch_size) ** 2)
        image_processor = CLIPImageProcessor(size=size, crop_size=crop)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=templates.LLAVA_15)
    return config, processor


def _qwen_tokenizer():
    """The Qwen2-VL / Qwen3-VL tokenizer: ChatML turns and vision start, end and pad tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    return wrap_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def _patch_sizes() -> dict:
    """Image and video processor sizes of the 14 px patch, 2x2 merge families (transformers' `size`
    spelling): 1 to 4 times IMAGE_SIZE squared pixels."""
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return dict(size={"shortest_edge": pixels, "longest_edge": 4 * pixels}, patch_size=14, merge_size=2,
                temporal_patch_size=2)


def build_qwen2_vl(version: str = "2"):
    from transformers import (Qwen2_5_VLConfig, Qwen2VLConfig, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, bos_token_id=None, model_type=f"qwen{version.replace('.', '_')}_vl_text",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [8, 12, 12]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    common = dict(text_config=text, image_token_id=ids("<|image_pad|>"),
                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    if version == "2":
        config = Qwen2VLConfig(**common, vision_config=dict(vision, mlp_ratio=2, hidden_size=TEXT["hidden_size"]))
    else:
        config = Qwen2_5_VLConfig(**common, vision_config=dict(
            vision, intermediate_size=64, out_hidden_size=TEXT["hidden_size"], window_size=56,
            fullatt_block_indexes=[1]))
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=4 * pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    # vLLM expects a video processor config in the folder even for image-only use.
    video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=4 * pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=templates.CHATML_QWEN)
    return config, processor


def build_idefics3(smol: bool = False):
    """Idefics3, or SmolVLM (`smol`): the same SigLIP + pixel-shuffle + Llama layout under
    SmolVLM's config and processor classes (its processor also holds a video processor)."""
    from transformers import (Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, SmolVLMConfig,
                              SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor)
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = wrap_tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>",
                               pad="<|endoftext|>", extra={"image_token": "<image>",
                                                          "fake_image_token": "<fake_token_around_image>",
                                                          "global_image_token": "<global-img>"})
    scale = 2
    config = (SmolVLMConfig if smol else Idefics3Config)(
        text_config=dict(_text_config(tokenizer), model_type="llama"),
        vision_config=dict(VISION, image_size=IMAGE_SIZE, patch_size=14),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    sizes = dict(size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                 do_image_splitting=False)
    seq_len = ((IMAGE_SIZE // 14) ** 2) // (scale ** 2)
    if smol:
        processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**sizes), tokenizer=tokenizer,
                                     video_processor=SmolVLMVideoProcessor(**sizes), image_seq_len=seq_len,
                                     chat_template=templates.IDEFICS3)
    else:
        processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**sizes), tokenizer=tokenizer,
                                      image_seq_len=seq_len, chat_template=templates.IDEFICS3)
    return config, processor


def build_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    tokenizer = wrap_tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>",
                               extra={"image_token": "<image>"}, add_bos_token=False)
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // 14) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # The processor adds 1,024 <locXXXX> and 128 <segXXX> tokens: size the vocab after.
    tokenizer = processor.tokenizer
    config = PaliGemmaConfig(
        text_config=dict(_text_config(tokenizer), model_type="gemma"),
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=IMAGE_SIZE,
                           patch_size=14, vision_use_head=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=TEXT["hidden_size"])
    config.text_config.num_image_tokens = image_processor.image_seq_length
    return config, processor


def build_instructblip():
    from transformers import BlipImageProcessor, InstructBlipConfig, InstructBlipProcessor
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    # No `image_token` attribute: InstructBlipProcessor registers "<image>" itself
    # (and, in transformers 5.19, breaks on a plain-string attribute).
    tokenizer = wrap_tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>", add_bos_token=True)
    qformer_tokenizer = wrap_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], bos=None,
                                       eos="[SEP]", pad="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    num_query = 4
    config = InstructBlipConfig(
        vision_config=dict(VISION, image_size=IMAGE_SIZE, patch_size=14),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, vocab_size=len(qformer_tokenizer),
                            encoder_hidden_size=VISION["hidden_size"], max_position_embeddings=64,
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=dict(_text_config(tokenizer), model_type="llama"),
        num_query_tokens=num_query, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer, num_query_tokens=num_query)
    return config, processor


def build_qwen3_vl():
    """Qwen3-VL: a ViT with learned (interpolated) position embeddings and DeepStack features
    of its layer 0 added to the language model's first layer; interleaved M-RoPE."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor
    tokenizer = _qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, bos_token_id=None, model_type="qwen3_vl_text", head_dim=64,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [8, 12, 12], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=TEXT["hidden_size"],
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
    sizes = _patch_sizes()
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                                 video_processor=Qwen3VLVideoProcessor(**sizes), tokenizer=tokenizer,
                                 chat_template=templates.CHATML_QWEN)
    return config, processor


def build_internvl():
    """InternVL (3 / 3.5, the transformers-native layout): InternViT with a CLS token, pixel
    shuffle (downsample 0.5) and an MLP into Qwen2; images cut into up to 4 tiles of 56 px
    plus a thumbnail, 4 tokens per tile."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tokenizer = wrap_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                               extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    config = InternVLConfig(
        vision_config=dict(VISION, model_type="internvl_vision", image_size=IMAGE_SIZE, patch_size=14),
        text_config=dict(_text_config(tokenizer, bos_token_id=None), model_type="qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(size=size),
                                  image_seq_length=(IMAGE_SIZE // 14 // 2) ** 2,
                                  chat_template=templates.CHATML_INTERNVL)
    return config, processor


def build_glm4v():
    """GLM-4.1V: a ViT with 2D-RoPE and interpolated position embeddings, patch merging, and a
    GLM-4 language model with M-RoPE on half of each head (partial rotary)."""
    from transformers import Glm4vConfig, Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<|video|>"]
    tokenizer = wrap_tokenizer(specials, bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                               extra={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(tokenizer, bos_token_id=None, model_type="glm4v_text", head_dim=64,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                         "partial_rotary_factor": 0.5})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=TEXT["hidden_size"], image_size=IMAGE_SIZE)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image|>"),
                         video_token_id=ids("<|video|>"), image_start_token_id=ids("<|begin_of_image|>"),
                         image_end_token_id=ids("<|end_of_image|>"), video_start_token_id=ids("<|begin_of_video|>"),
                         video_end_token_id=ids("<|end_of_video|>"), tie_word_embeddings=False)
    sizes = _patch_sizes()
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(**sizes),
                               video_processor=Glm4vVideoProcessor(**sizes), tokenizer=tokenizer,
                               chat_template=templates.GLM4V)
    return config, processor


def build_gemma3():
    """Gemma 3: SigLIP, its patches average-pooled to mm_tokens_per_image soft tokens between
    <start_of_image> and <end_of_image>; a Gemma 3 language model (local and global layers)."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor
    # runs of 1-4 newlines are single tokens, as in Gemma's vocabulary (vLLM's Gemma 3 processor
    # looks them up to merge the newlines around an image with the text's)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>", "\n\n\n\n", "\n\n\n", "\n\n", "\n"]
    tokenizer = wrap_tokenizer(specials, bos="<bos>", eos="<end_of_turn>", pad="<pad>",
                               extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"}, add_bos_token=False)
    ids = tokenizer.convert_tokens_to_ids
    tokens = 4  # 4 x 4 patches of 14 px pooled to 2 x 2
    config = Gemma3Config(
        text_config=dict(_text_config(tokenizer), model_type="gemma3_text", num_key_value_heads=1, head_dim=64,
                         query_pre_attn_scalar=64, sliding_window=512),
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=14,
                           vision_use_head=False),
        mm_tokens_per_image=tokens, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False)
    image_processor = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens,
                                chat_template=templates.GEMMA3)
    return config, processor


def build_llava_onevision():
    """SigLIP + Qwen2, any-resolution tiles of 56 px (16 tokens each) plus the base image."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = wrap_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                               extra={"image_token": "<image>", "video_token": "<video>"})
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = LlavaOnevisionConfig(
        vision_config=dict(VISION, model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=14),
        text_config=dict(_text_config(tokenizer, bos_token_id=None), model_type="qwen2"),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, num_image_tokens=(IMAGE_SIZE // 14) ** 2,
                                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                        chat_template=templates.CHATML_ONEVISION)
    return config, processor


BUILDERS: dict[str, Callable] = {
    "llava": lambda **sizes: build_llava(next_version=False, **sizes),
    "llava_next": lambda: build_llava(next_version=True),
    "qwen2_vl": lambda: build_qwen2_vl("2"),
    "qwen2_5_vl": lambda: build_qwen2_vl("2.5"),
    "idefics3": lambda: build_idefics3(),
    "smolvlm": lambda: build_idefics3(smol=True),
    "paligemma": build_paligemma,
    "instructblip": build_instructblip,
    "llava_onevision": build_llava_onevision,
    "qwen3_vl": build_qwen3_vl,
    "internvl": build_internvl,
    "glm4v": build_glm4v,
    "gemma3": build_gemma3,
}
FAMILIES = tuple(BUILDERS)

# transformers 5 saves CLIP/SigLIP towers inside LLaVA-style models without their
# `vision_model.` level; hub checkpoints (and vLLM's loaders) have it. transformers
# maps the hub names back on load, so writing the hub layout serves both.
from vlrlhf.models.weights import HUB_RENAMES  # noqa: E402  (families and model types coincide here)


def rewrite_to_hub_layout(family: str, folder: pathlib.Path) -> None:
    if family not in HUB_RENAMES:
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    old, new = HUB_RENAMES[family]
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {(new + key[len(old):] if key.startswith(old) and not key.startswith(new) else key):
                   handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, path, metadata=metadata)


def build_tiny_model(family: str, out_dir: str | pathlib.Path, seed: int = 0, **sizes) -> pathlib.Path:
    """Write a tiny random checkpoint of `family` to `out_dir` and return the path. `sizes`:
    the builder's size overrides (build_llava's text/vision/image_size/patch_size)."""
    if family not in BUILDERS:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config, processor = BUILDERS[family](**sizes)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    rewrite_to_hub_layout(family, out)
    processor.save_pretrained(out)
    # Also the per-component files that hub checkpoints carry and vLLM reads
    # (preprocessor_config.json, video_preprocessor_config.json).
    for part in ("image_processor", "video_processor"):
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(out)
    (out / "vlrlhf_tiny.json").write_text(json.dumps({"family": family, "seed": seed, **sizes}) + "\n")
    return out


TINY_SCHEME = "tiny:"


def ensure_tiny_model(spec: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """'tiny:FAMILY' -> the folder of that tiny checkpoint, built once into the cache
    (VLRLHF_CACHE, default ~/.cache/vlrlhf). Built in a temp folder and renamed, so
    concurrent jobs never see half a checkpoint."""
    family = spec[len(TINY_SCHEME):] if spec.startswith(TINY_SCHEME) else spec
    if family not in BUILDERS:
        raise ValueError(f"model.path={spec!r}: tiny family {family!r} is not one of {', '.join(FAMILIES)}")
    root = pathlib.Path(cache_dir or os.environ.get("VLRLHF_CACHE") or pathlib.Path.home() / ".cache" / "vlrlhf")
    final = root / "tiny" / family
    if not (final / "vlrlhf_tiny.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = pathlib.Path(tempfile.mkdtemp(prefix=f".{family}-", dir=final.parent))
        build_tiny_model(family, temp)
        try:
            temp.rename(final) if not final.exists() else shutil.rmtree(temp)
        except OSError:  # another process won the race
            shutil.rmtree(temp, ignore_errors=True)
    return final
