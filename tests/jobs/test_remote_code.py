"""`model.trust_remote_code` end to end: a VLM whose classes exist only in its checkpoint
folder (auto_map), trained with DPO through an adapter class named in the spec. The
pipeline's encoders, the reference stage and the policy load it; the checkpoint carries
its modeling file and loads back with from_pretrained."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from jobs.run import run_job
from tests.jobs.remote_vlm import write_remote_vlm
from vlrlhf.models.base import LoadOptions
from vlrlhf.models.registry import load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
ADAPTER = "tests.jobs.remote_vlm:TinyRemoteAdapter"


def test_a_remote_code_vlm_trains_dpo_through_its_own_adapter(ray_cluster, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    model = write_remote_vlm(tmp_path / "remote")
    with pytest.raises(ValueError, match="trust_remote_code"):  # never runs its code unasked
        load_adapter(model, adapter=ADAPTER)
    adapter = load_adapter(model, adapter=ADAPTER, options=LoadOptions(trust_remote_code=True))
    example = adapter.encode([{"role": "user", "content": "<image>\nWhat colour?"},
                              {"role": "assistant", "content": "red"}], [Image.new("RGB", (56, 56), "red")])
    assert example.input_ids.count(adapter.config.image_token_id) == 4  # (28 / 14) ** 2 patches
    answer = [t for t in example.labels if t != -100]
    assert adapter.tokenizer.decode(answer) == "red</s>"

    run_dir, checkpoints = tmp_path / "run", tmp_path / "ck"
    overrides = [f"model.path={model}", f"model.adapter={ADAPTER}", "model.trust_remote_code=true",
                 "model.freeze_vision=true", "algorithm.loss_type={sigmoid: 1.0}", "trainer.max_steps=2",
                 "trainer.eval_every=0", "data.eval=[]", f"checkpoint.dir={checkpoints}"]
    assert run_job(str(ROOT / "configs" / "demo_dpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert math.isfinite(losses[1]) and losses[1] != losses[0]
    saved = checkpoints / "step-000002"
    assert (saved / "modeling_tiny_remote.py").is_file()  # the code travels with the weights
    trained = AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True)
    initial = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True)
    assert type(trained).__name__ == "TinyRemoteForConditionalGeneration"
    head = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dict(trained.named_parameters())[head], dict(initial.named_parameters())[head])
    vision = "model.vision.weight"  # freeze_vision: the tower the adapter names stays as it was
    assert torch.equal(dict(trained.named_parameters())[vision], dict(initial.named_parameters())[vision])
