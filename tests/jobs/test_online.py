"""Online RL: the policy-gradient micro-step by hand, and GRPO / RLOO runs through `vlrlhf run`."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from actors.rollout import Sample, Sampling, TransformersEngine
from jobs.online import collate_rl, rl_examples
from jobs.run import run_job
from tests.actors.rollout_check import request
from vlrlhf.config import OnlineSpec
from vlrlhf.training import rl_micro_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_rl_micro_step_at_ratio_one_is_the_token_weighted_advantage(tiny_path):
    engine = TransformersEngine(str(tiny_path("llava")))
    req = request("red")
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    samples = engine.generate([req], Sampling(n=3, temperature=1.0, max_tokens=5, seed=1))
    advantages = [1.0, -0.5, 2.0]
    rows = [(example, sample.logprobs, a) for example, sample, a in
            zip(rl_examples(engine.adapter, prompt, samples), samples, advantages, strict=True)]
    batch = collate_rl(engine.adapter, rows)
    lengths = [s.length for s in samples]
    online = OnlineSpec(rewards=[{"function": "exact_match"}], kl_coef=0.5)
    engine.model.train()
    loss, metrics = rl_micro_step(engine.adapter, engine.model, batch, None, online, float(sum(lengths)))
    # behaviour log-probs == current log-probs: ratio 1, no clipping; loss = -sum_i A_i |y_i| / sum_i |y_i|
    expected = -sum(a * n for a, n in zip(advantages, lengths, strict=True)) / sum(lengths)
    assert float(loss) == pytest.approx(expected, abs=1e-4)
    assert metrics["clip_fraction_sum"] == 0.0 and metrics["count"] == sum(lengths)
    # the KL term: against itself it is 0; against a shifted reference, k3 summed over tokens
    ref = engine.adapter.token_logprobs(engine.model, batch.batch).detach()
    same, _ = rl_micro_step(engine.adapter, engine.model, batch, ref, online, float(sum(lengths)))
    assert float(same) == pytest.approx(expected, abs=1e-4)
    shifted = ref - 0.1 * batch.batch.loss_mask
    kl_loss, kl_metrics = rl_micro_step(engine.adapter, engine.model, batch, shifted, online, float(sum(lengths)))
    k3 = math.exp(-0.1) - 1 + 0.1  # (r - 1) - log r with log r = -0.1 on every completion token
    assert kl_metrics["kl_sum"] == pytest.approx(k3 * sum(lengths), rel=1e-3)
    assert float(kl_loss) == pytest.approx(expected + 0.5 * k3, abs=1e-4)


def test_samples_become_rows_with_labels_on_the_completion_only(tiny_path):
    engine = TransformersEngine(str(tiny_path("qwen2_vl")))
    req = request("blue")
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    sample = Sample(0, [5, 6, 7], [-0.1, -0.2, -0.3], "length", "")
    (row,) = rl_examples(engine.adapter, prompt, [sample])
    batch = collate_rl(engine.adapter, [(row, sample.logprobs, 1.0)])
    assert batch.batch.loss_mask[0].nonzero().flatten().tolist() == [len(prompt.input_ids) + i for i in range(3)]
    assert batch.old_logps[0, len(prompt.input_ids):].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert all(len(v) == len(row.input_ids) for v in row.token_arrays.values())


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_online_smoke_run(ray_cluster, tmp_path, algorithm):
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=2", f"algorithm.name={algorithm}", f"checkpoint.dir={tmp_path / 'ck'}",
                 "online.prompts_per_step=4"]
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert all(math.isfinite(row["train/reward"]) and row["time/rollout_s"] > 0 for row in steps)
    assert any("train/loss" in row and row["train/synced_tensors"] > 0 for row in steps)  # trained and synced
    assert (tmp_path / "ck" / "step-000002" / "model.safetensors").is_file()
    assert torch.load(tmp_path / "ck" / "step-000002" / "trainer_state.pt", weights_only=False)["step"] == 2


def test_online_section_goes_with_the_online_algorithms():
    from vlrlhf.config import SpecError, load_spec

    with pytest.raises(SpecError, match="online section is required"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["online=null"])
    with pytest.raises(SpecError, match="online section is required"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["algorithm.name=dpo"])
    with pytest.raises(SpecError, match="online.n: Input should be greater than or equal to 2"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml", ["online.n=1"])
