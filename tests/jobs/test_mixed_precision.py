"""bf16 training under ddp: bf16 compute over fp32 master weights, so that a small step moves
the weights as an fp32 step does (AdamW on bf16 weights rounds a 5e-7 update away)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from actors.common import mixed_precision
from actors.policy import PolicyWorker
from actors.reference import ReferenceWorker
from jobs.common import normaliser_for, shard
from vlrlhf.config import AlgorithmSpec, LoraSpec, ModelSpec, TrainerSpec
from vlrlhf.data.pipeline import EncodeSettings, EncodedItem, encode_record
from vlrlhf.data.reader import read_records
from vlrlhf.models.registry import load_adapter

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "shapes"
LR = 5e-7  # the Qwen2.5-VL DPO template's learning rate


@pytest.fixture(scope="module")
def pairs(tiny_path):
    path = tiny_path("llava")
    adapter = load_adapter(path)
    settings = EncodeSettings(model_path=str(path), task="preference", image_root=str(DATA))
    records = read_records(str(DATA / "preference.json"), "plain_dpo")[:8]
    return path, adapter, [EncodedItem(i, r.id, r, encode_record(adapter, r, settings)) for i, r in enumerate(records)]


def one_step(dtype: str, path, adapter, items, reference, lora=None):
    """The trainable weights' change over one DPO step, the weights before it, the dtype a
    decoder projection computed in, and the worker."""
    model = ModelSpec(path=str(path), dtype=dtype, lora=lora)
    algorithm = AlgorithmSpec(name="dpo", beta=0.1)
    policy = PolicyWorker(model, algorithm, TrainerSpec(lr=LR, lr_schedule="constant", max_grad_norm=None,
                                                        batch_size=8, seed=0), 10)
    assert all(p.dtype == torch.float32 for p in policy.parameters)  # the master weights
    computed = []  # the dtype the decoder's first projection computed in
    layer = policy.adapter.language_model(policy.model).layers[0]
    projection = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    handle = projection.register_forward_hook(lambda _m, _i, out: computed.append(out.dtype))
    before = policy.trainable_state()
    shards = shard(items, 1, 8, adapter)
    policy.train_step(shards[0], reference.logprobs(shards[0]),
                      normaliser_for(type("S", (), {"algorithm": algorithm}), items))
    handle.remove()
    after = policy.trainable_state()
    return torch.cat([(after[n] - before[n]).flatten() for n in before]), before, computed[0], policy


def test_a_bf16_step_at_lr_5e_7_moves_the_weights_as_the_fp32_step_does(pairs):
    path, adapter, items = pairs
    reference = ReferenceWorker(ModelSpec(path=str(path)))
    fp32, _, fp32_compute, _ = one_step("float32", path, adapter, items, reference)
    mixed, weights, mixed_compute, _ = one_step("bfloat16", path, adapter, items, reference)
    assert (fp32_compute, mixed_compute) == (torch.float32, torch.bfloat16)
    # AdamW's first step moves a weight by lr * g / (|g| + eps), i.e. lr * sign(g): the bf16
    # step must agree wherever bf16 gradients keep the sign, and move as much in total.
    agree = (mixed - fp32).abs() <= 0.01 * LR
    assert agree.float().mean() > 0.95
    assert float(mixed.abs().sum()) == pytest.approx(float(fp32.abs().sum()), rel=0.02)
    # What the step used to do: the same update applied to bf16 weights leaves most unmoved.
    flat = torch.cat([w.flatten() for w in weights.values()]).bfloat16()
    moved_in_bf16 = ((flat.float() + fp32).bfloat16() != flat).float().mean()
    assert moved_in_bf16 < 0.2


def test_lora_keeps_the_frozen_base_in_bf16_and_the_adapters_in_fp32(pairs):
    path, adapter, items = pairs
    reference = ReferenceWorker(ModelSpec(path=str(path), dtype="bfloat16"))
    delta, _, computed, policy = one_step("bfloat16", path, adapter, items, reference, lora=LoraSpec(r=4, alpha=8))
    assert computed == torch.bfloat16 and delta.abs().max() > 0
    assert {value.dtype for value in policy.frozen_state().values()} == {torch.bfloat16}


def test_fp16_under_ddp_is_refused_and_deepspeed_keeps_its_own_master_weights():
    with pytest.raises(ValueError, match="loss scaling"):
        mixed_precision(ModelSpec(path="x", dtype="float16"), TrainerSpec())
    assert mixed_precision(ModelSpec(path="x", dtype="bfloat16"), TrainerSpec(strategy="deepspeed")) is None
    assert mixed_precision(ModelSpec(path="x", dtype="bfloat16"), TrainerSpec()) is torch.bfloat16
