"""The memory plan: counts from config.json alone, model states against DeepSpeed's own
estimators, activations against the bytes a forward pass saves for backward."""

from __future__ import annotations

import pytest
import torch

from tests.model_configs import config_folder
from vlrlhf.memory import GIB, activation_bytes, kv_cache_tokens, layer_bytes, model_shape, training_states

@pytest.fixture(scope="module")
def llava7b(tmp_path_factory):  # a folder with config.json only: nothing to download
    return model_shape(str(config_folder(tmp_path_factory.mktemp("configs"), "llava-1.5-7b-hf")))


def test_a_config_alone_gives_the_models_counts(llava7b, tmp_path):
    assert llava7b.total == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's parameter count
    assert llava7b.vision == 303_507_456  # CLIP ViT-L/14-336
    assert llava7b.largest == 32064 * 4096  # the embedding (and the LM head): what ZeRO-3 gathers whole
    # LoRA on the 7 projections of 32 layers: r (in + out) each
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)
    assert llava7b.lora(64) == 64 * 32 * per_layer == 159_907_840
    assert model_shape(str(config_folder(tmp_path, "Qwen2.5-VL-7B-Instruct"))).total == 8_292_166_656
    assert model_shape(str(config_folder(tmp_path, "llava-v1.6-mistral-7b-hf"))).total == 7_566_747_648


@pytest.mark.parametrize("world", [1, 8, 64])
def test_model_states_equal_deepspeeds_estimators(llava7b, world):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = llava7b.total
    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, llava7b.largest, num_gpus_per_node=world,
                                                        cpu_offload=False)
    ours = {stage: training_states(llava7b, "bfloat16", None, freeze_vision=False, strategy="deepspeed",
                                   zero_stage=stage, world=world) for stage in (2, 3)}
    assert ours[2] == pytest.approx(zero2, abs=1) and ours[3] == pytest.approx(zero3, abs=1)


def test_ddp_states_by_hand(llava7b):
    total, vision = llava7b.total, llava7b.vision
    full = training_states(llava7b, "bfloat16", None, freeze_vision=True)
    assert full == 4 * total + 12 * (total - vision)  # fp32 masters of everything, gradients and moments of the rest
    assert full / GIB > 100  # the reason the 7B templates cannot fine-tune fully on ddp
    lora = training_states(llava7b, "bfloat16", 64, freeze_vision=True)
    assert lora == 2 * total + 16 * 159_907_840 and lora / GIB == pytest.approx(15.5, abs=0.1)


def saved_for_backward(function) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `function` runs."""
    seen = {}

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(seen.values())


@pytest.mark.parametrize("sizes", [{}, {"text": {"hidden_size": 256, "intermediate_size": 688,
                                                  "num_hidden_layers": 3}}], ids=["tiny", "wider"])
def test_activations_against_what_a_forward_pass_saves(tmp_path, sizes):
    """Measured: the storages autograd saves in a training forward of a frozen-tower LLaVA (fp32
    on CPU, whose attention path keeps a little more than flash attention would). The estimate
    must be within 25% either way, with and without gradient checkpointing (forward part)."""
    from vlrlhf.models.registry import load_adapter
    from vlrlhf.models.tiny import build_tiny_model

    path = build_tiny_model("llava", tmp_path / "m", **sizes)
    shape = model_shape(str(path))
    model = load_adapter(path).load_model().train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("vision_tower" not in name)
    ids = torch.randint(5, 300, (4, 96))
    tokens = ids.numel()
    forward = lambda: model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)  # noqa: E731
    plain = saved_for_backward(forward)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = saved_for_backward(forward)
    assert 0.8 < activation_bytes(shape, tokens, "float32", False) / plain < 1.25
    kept = activation_bytes(shape, tokens, "float32", True) - layer_bytes(shape, tokens, "float32")
    assert 0.8 < kept / checkpointed < 1.25
    assert checkpointed < plain / 2


def test_kv_cache_by_hand(llava7b):
    """An engine with 0.4 of an 80 GiB GPU: 32 GiB less 13.2 GiB of bf16 weights and 1 GiB of
    buffers, at 2 x 32 layers x 4096 x 2 bytes = 512 KiB a token."""
    tokens = kv_cache_tokens(llava7b, "bfloat16", 80 * GIB, 0.4)
    assert tokens == int((0.4 * 80 * GIB - 2 * llava7b.total - GIB) // (512 * 1024))
    assert 35_000 < tokens < 37_000
    assert kv_cache_tokens(llava7b, "bfloat16", 80 * GIB, 0.15) == 0  # the weights alone do not fit
