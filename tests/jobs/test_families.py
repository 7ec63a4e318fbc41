"""The newer families through whole jobs (`vlrlhf run configs/demo_*.yaml model.path=DIR`):
offline DPO with LoRA on the language model only, online GRPO, checkpoints that load back."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from jobs.run import run_job

ROOT = pathlib.Path(__file__).resolve().parents[2]


def metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen3_vl", "internvl", "glm4v", "gemma3"])
def test_dpo_with_lora_and_grpo_train_and_save_loadable_checkpoints(ray_cluster, tmp_path, tiny_path, family):
    from peft import PeftModel

    from vlrlhf.models.registry import load_adapter

    model = tiny_path(family)
    dpo = tmp_path / "dpo"
    overrides = [f"model.path={model}", "model.lora={r: 4, alpha: 8}", "reference.mode=policy",
                 "trainer.max_steps=2", "trainer.eval_every=0", "data.eval=[]", "resources.policy.num_workers=0",
                 f"checkpoint.dir={tmp_path / 'dpo-ck'}"]
    assert run_job(str(ROOT / "configs" / "demo_dpo.yaml"), overrides, run_dir=str(dpo)) == 0
    losses = [row["train/loss"] for row in metrics(dpo) if "train/loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    checkpoint = tmp_path / "dpo-ck" / "step-000002"
    loaded = PeftModel.from_pretrained(load_adapter(model).load_model(), checkpoint)
    adapted = {name for name, _ in loaded.named_parameters() if "lora_" in name}
    assert adapted and all("language_model" in name for name in adapted)  # LoRA on the language model only

    grpo = tmp_path / "grpo"
    overrides = [f"model.path={model}", "trainer.max_steps=2", "online.prompts_per_step=2", "online.n=2",
                 "online.skip_equal_groups=false", "resources.policy.num_workers=0",  # in the driver, as DPO
                 f"checkpoint.dir={tmp_path / 'grpo-ck'}"]
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(grpo)) == 0
    steps = [row for row in metrics(grpo) if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2] and all(row["train/synced_tensors"] > 0 for row in steps)
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "grpo-ck" / "step-000002")
    assert trained.config.model_type == family
