"""Every rank runs the vision tower in every forward (ZeRO-3).

ZeRO-3 gathers each module's weights from all ranks when the module runs, so the ranks must
run the same modules in the same order. A micro-batch with no image skips the vision tower:
its rank goes on to the language model's gathers while a rank with images waits in the
tower's, and the job hangs (or pairs gathers of different weights). Here, when the VLM body
is called without pixels, a blank image's features are computed right after the token
embeddings (where a rank with images computes its images' features) and added to the
embeddings times zero: the same gathers in the same order, no change to the values, and
zero gradients for the tower. Families whose body has no `get_image_features` are left
as they are (said by `keep_vision_in_every_forward`'s return value).
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image

from vlrlhf.models.base import unwrap

PROBE_SIDE = 56  # the blank image's side (pixels)


def probe_inputs(adapter, body) -> dict[str, torch.Tensor]:
    """The vision inputs of one blank image, as this adapter encodes and collates them,
    restricted to what `body.get_image_features` takes."""
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "."}]
    example = adapter.encode(messages, [Image.new("RGB", (PROBE_SIDE, PROBE_SIDE), "white")])
    inputs = adapter.model_inputs(adapter.collate([example]))
    accepted = set(inspect.signature(body.get_image_features).parameters)
    return {name: value for name, value in inputs.items()
            if name in accepted and name not in ("input_ids", "attention_mask") and torch.is_tensor(value)}


def total(value) -> torch.Tensor | None:
    """The sum of every floating-point tensor in a (nested) model output."""
    if torch.is_tensor(value):
        return value.float().sum() if value.is_floating_point() else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        sums = [s for s in (total(item) for item in value) if s is not None]
        return torch.stack(sums).sum() if sums else None
    return None


def used_features(output) -> torch.Tensor | None:
    """The sum of the features the body passes on to the language model: `pooler_output` (the
    projected image features) and Qwen3-VL's DeepStack features, not the tower's other hidden
    states. A weight a rank with images leaves without a gradient (LLaVA's last CLIP layer,
    under vision_feature_layer -2) must get none here either, or ZeRO-3's gradient
    reductions differ between ranks."""
    if not hasattr(output, "pooler_output"):
        return total(output)
    sums = [s for s in (total(output.pooler_output), total(getattr(output, "deepstack_features", None)))
            if s is not None]
    return torch.stack(sums).sum() if sums else None


def keep_vision_in_every_forward(adapter, model) -> bool:
    """Hooks on `model`'s VLM body: a forward without pixels runs the tower on a blank image
    (weighted zero). False where the family's body has no `get_image_features`."""
    body = getattr(unwrap(model), "model", None)
    if body is None or not hasattr(body, "get_image_features"):
        return False
    probe = probe_inputs(adapter, body)
    pending = {"probe": False}

    def before_body(module, args, kwargs):
        pending["probe"] = kwargs.get("pixel_values") is None

    def after_embeddings(module, args, output):
        if not pending["probe"]:
            return output
        pending["probe"] = False
        dtype = next(body.parameters()).dtype
        inputs = {name: value.to(output.device, dtype=dtype if value.is_floating_point() else value.dtype)
                  for name, value in probe.items()}
        features = used_features(body.get_image_features(**inputs))
        return output if features is None else output + 0.0 * features.to(output.dtype)

    body.register_forward_pre_hook(before_body, with_kwargs=True)
    body.get_input_embeddings().register_forward_hook(after_embeddings)
    return True
