"""config.json of the 7B models the GPU templates name: enough for `vlrlhf plan`'s memory
plan and vlrlhf.memory (parameters are counted on the meta device; nothing downloads)."""

from __future__ import annotations

import json
import pathlib

CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "projection_dim": 768}
LLAVA15_7B = {  # llava-hf/llava-1.5-7b-hf: Llama-2-7B and CLIP ViT-L/14-336
    "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "vision_config": CLIP_L_336}
LLAVA_NEXT_MISTRAL_7B = {  # llava-hf/llava-v1.6-mistral-7b-hf
    "model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"], "image_token_index": 32000,
    "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064,
                    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5},
    "vision_config": CLIP_L_336}
QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "tie_word_embeddings": False,
                    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3,
                      "hidden_act": "silu"}}
# the folder names the templates' model.path ends with
BY_NAME = {"llava-1.5-7b-hf": LLAVA15_7B, "llava-v1.6-mistral-7b-hf": LLAVA_NEXT_MISTRAL_7B,
           "Qwen2.5-VL-7B-Instruct": QWEN25_VL_7B}


def config_folder(root: pathlib.Path, name: str) -> pathlib.Path:
    """A folder holding only `name`'s config.json."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BY_NAME[name]))
    return folder
