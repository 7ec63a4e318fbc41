"""GPU memory per role, planned from the model's configuration alone (a folder with config.json).

    shape = model_shape("/models/llava-1.5-7b-hf")       # parameters counted on the meta device
    states = policy_states(shape, spec.model, spec.trainer, world=8)   # bytes per GPU
    active = activation_bytes(shape, tokens=4 * 2048, dtype="bfloat16", checkpointing=True)

Model states per GPU (P parameters, T of them trained, N data-parallel ranks, b bytes of
model.dtype):
  ddp, full fine-tuning   4P + 12T        fp32 weights (the master copy), fp32 gradients, AdamW's two moments
  ddp, LoRA (L adapters)  bP + 16L        the base at model.dtype; adapters, gradients and moments in fp32
  ZeRO-2                  2P + 18T/N      16-bit weights; 16- and 32-bit gradients, fp32 master and moments
                                          partitioned (DeepSpeed's estimate_zero2_model_states_mem_needs)
  ZeRO-3                  4W + 18T/N + 2(P-T)/N   W: the largest module's own parameters, gathered whole
                                          (estimate_zero3_model_states_mem_needs)
  reference, reward       bP
  vLLM engine             gpu_memory_utilization x the GPU: weights bP, the rest KV cache at
                          2 x layers x kv_heads x head_dim x b per token

Activations kept for the backward pass, per token of a micro-batch (elements, b bytes each;
h hidden, i intermediate, k = kv_heads x head_dim, L layers, V vocabulary):
  L (10h + 3k + 4i) + 2h     without checkpointing (norms' inputs and outputs, q/k/v after the
                             rotary embedding, attention output, residuals, the MLP's gate, up,
                             activation and product)
  L h + 2h                   with gradient checkpointing (each layer's input), plus one layer's
                             10h + 3k + 4i while it is recomputed in the backward pass
  + V (b + 4)                the logits and their fp32 log-softmax
A frozen vision tower keeps nothing (no gradient flows into it). tests/test_memory.py checks
the model states against DeepSpeed's estimators and the activations against the bytes a
forward pass saves for backward on small models.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VISION_NAMES = ("vision_tower", "visual", "vision_model", "qformer")


@dataclasses.dataclass
class Shape:
    total: int  # parameters
    vision: int  # of which in the vision tower
    largest: int  # the largest module's own parameters (what ZeRO-3 gathers at once)
    lora_shapes: list[tuple[int, int]]  # (in, out) of the language model's linear layers
    layers: int
    hidden: int
    intermediate: int
    kv: int  # kv_heads x head_dim
    vocab: int

    def lora(self, rank: int) -> int:
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.lora_shapes)


def model_shape(path: str, trust_remote_code: bool = False) -> Shape:
    """Counted on the meta device from the checkpoint's config.json: no weights are read."""
    import torch

    from vlrlhf.models.weights import skeleton

    model = skeleton(path, trust_remote_code)
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    total = vision = largest = 0
    linears = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
        total += own
        if any(part in name for part in VISION_NAMES):
            vision += own
        elif isinstance(module, torch.nn.Linear) and "language_model" in name:
            linears.append((module.in_features, module.out_features))
    return Shape(total, vision, largest, linears, text.num_hidden_layers, text.hidden_size,
                 text.intermediate_size, (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
                 text.vocab_size)


def trained(shape: Shape, freeze_vision: bool) -> int:
    return shape.total - (shape.vision if freeze_vision else 0)


def training_states(shape: Shape, dtype: str, lora_rank: int | None, freeze_vision: bool, strategy: str = "ddp",
                    zero_stage: int = 2, world: int = 1) -> int:
    """Bytes per GPU of weights, gradients and optimizer state for a trained model (see the module doc)."""
    total, width = shape.total, BYTES[dtype]
    train = shape.lora(lora_rank) if lora_rank else trained(shape, freeze_vision)
    if strategy == "ddp":
        return width * total + 16 * train if lora_rank else 4 * total + 12 * train
    if zero_stage == 2:
        return 2 * total + 18 * train // world
    return 4 * shape.largest + (18 * train + 2 * (total - train)) // world


def layer_bytes(shape: Shape, tokens: int, dtype: str) -> int:
    """One decoder layer's activations for `tokens` tokens."""
    return tokens * (10 * shape.hidden + 3 * shape.kv + 4 * shape.intermediate) * BYTES[dtype]


def activation_bytes(shape: Shape, tokens: int, dtype: str, checkpointing: bool) -> int:
    """Bytes kept for the backward pass by a micro-batch of `tokens` tokens, at the peak (with
    checkpointing: the layers' inputs plus the layer being recomputed)."""
    width = BYTES[dtype]
    rest = tokens * (2 * shape.hidden * width + shape.vocab * (width + 4))
    if checkpointing:
        return tokens * shape.layers * shape.hidden * width + layer_bytes(shape, tokens, dtype) + rest
    return shape.layers * layer_bytes(shape, tokens, dtype) + rest


def kv_cache_tokens(shape: Shape, dtype: str, gpu_bytes: float, utilization: float) -> int:
    """How many tokens a vLLM engine's KV cache holds (0 when its weights do not fit its share)."""
    weights = BYTES[dtype] * shape.total
    per_token = 2 * shape.layers * shape.kv * BYTES[dtype]
    return max(0, int((utilization * gpu_bytes - weights - GIB) // per_token))  # ~1 GiB for vLLM's own buffers
