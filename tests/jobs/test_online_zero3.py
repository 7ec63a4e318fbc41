"""GRPO with DeepSpeed ZeRO-3 equals ZeRO-2 on the same seed: the weights the engines get
are gathered from the partitions (ZeRO-3 keeps only a shard of each parameter on a rank).

The model is a wider tiny LLaVA (text hidden 384): ZeRO-3 keeps parameters under 1e5
elements whole on every rank after the first forward (stage3_param_persistence_threshold),
which would leave the standard tiny model with nothing partitioned to gather."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from jobs.run import run_job

ROOT = pathlib.Path(__file__).resolve().parents[2]


WIDE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=6, head_dim=64)  # 384 x 384 = 147k elements per projection


def test_grpo_zero3_equals_zero2_with_the_weights_synced_whole(ray_cluster, tmp_path):
    from vlrlhf.models.tiny import build_tiny_model

    model = build_tiny_model("llava", tmp_path / "wide", text=WIDE)
    runs = {}
    for stage, sync in ((2, "object_store"), (3, "collective")):  # ZeRO-3's gather under both sync paths' verb
        overrides = ["trainer.max_steps=2", "online.prompts_per_step=4", "online.n=4", "trainer.lr=1e-3",
                     "trainer.strategy=deepspeed", f"trainer.zero_stage={stage}", "trainer.micro_batch_size=4",
                     f"online.weight_sync={sync}", "resources.policy={num_workers: 2, cpus: 0.5}",
                     "resources.rollout={num_workers: 1, cpus: 0.5}", f"checkpoint.dir={tmp_path / f'ck{stage}'}",
                     f"model.path={model}"]
        assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(tmp_path / f"z{stage}")) == 0
        rows = [json.loads(line) for line in (tmp_path / f"z{stage}" / "metrics.jsonl").read_text().splitlines()]
        runs[stage] = [row for row in rows if "train/reward" in row]
    two, three = runs[2], runs[3]
    assert [row["step"] for row in three] == [1, 2]
    assert all(row["train/synced_tensors"] > 0 for row in three)
    assert three[0]["train/synced_tensors"] == two[0]["train/synced_tensors"]
    # step 2 samples from the synced weights: the same samples, rewards and losses
    for a, b in zip(two, three, strict=True):
        assert b["train/reward"] == a["train/reward"] and b["train/response_length"] == a["train/response_length"]
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
        assert b["train/ratio"] == pytest.approx(1.0, abs=1e-4)  # engine == policy at the first mini-batch
    from transformers import AutoModelForImageTextToText

    final = {stage: dict(AutoModelForImageTextToText.from_pretrained(tmp_path / f"ck{stage}" / "step-000002")
                         .named_parameters()) for stage in (2, 3)}
    for name, value in final[2].items():
        torch.testing.assert_close(final[3][name], value, atol=1e-4, rtol=0)
