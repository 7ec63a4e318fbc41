"""Tensor names between a loaded model and its checkpoint files (weight sync to vLLM).

transformers 5 renames checkpoint keys on load (`language_model.model.` ->
`model.language_model.`, ...) and reverts that on save; hub checkpoints of
LLaVA-style models also keep the CLIP/SigLIP `vision_model.` level that transformers
drops. vLLM's loaders read the checkpoint (hub) names, so tensors sent from a
training model are renamed the way `save_pretrained` would, plus that level.
"""

from __future__ import annotations

import torch

HUB_RENAMES = {model_type: ("vision_tower.", "vision_tower.vision_model.")
               for model_type in ("llava", "llava_next", "llava_onevision", "paligemma", "gemma3")}


def skeleton(model_path: str, trust_remote_code: bool = False):
    """The model's module tree on the meta device (no memory): enough to know its names."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def to_checkpoint_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory parameter names -> the names in the model's hub checkpoint files."""
    from transformers.core_model_loading import revert_weight_conversion

    renamed = revert_weight_conversion(model, dict(state))
    rename = HUB_RENAMES.get(model.config.model_type)
    if rename is None:
        return renamed
    old, new = rename
    return {(new + key[len(old):] if key.startswith(old) and not key.startswith(new) else key): value
            for key, value in renamed.items()}
